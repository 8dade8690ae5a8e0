"""FlashCore: sparse paged attention for Hugging Face transformers.

`import flashcore_hf` registers the `flashcore` op library and the `"flashcore"` attention implementation
(`AutoModelForCausalLM.from_pretrained(path, attn_implementation="flashcore")`), applying the transformers patches
that implementation needs (flashcore_hf.patches).
"""
from ._ext import HAS_CUDA_KERNELS
from .attention import FlashCoreAttention, FlashCoreFallbackWarning
from .decode_graphs import decode_graph_stats, release_decode_graphs, set_cuda_graphs
from .integration import (ATTN_IMPLEMENTATION, flashcore_attention_forward, flashcore_mask, register,
                          set_default_cache_options, unpatch)
from .layout import PageLayout
from .ops import append_kv, build_layout, kernel_supports, paged_attention
from .page_allocator import OutOfPagesError, PageAllocator
from .paged_cache import CacheStats, PagedKVCache
from .patches import CACHE_KWARG
from .sparse import SparseConfig

register()

__all__ = ["ATTN_IMPLEMENTATION", "CACHE_KWARG", "CacheStats", "FlashCoreAttention", "FlashCoreFallbackWarning",
           "HAS_CUDA_KERNELS", "OutOfPagesError", "PageAllocator", "PageLayout", "PagedKVCache", "SparseConfig",
           "append_kv", "build_layout", "decode_graph_stats", "flashcore_attention_forward", "flashcore_mask",
           "kernel_supports", "paged_attention", "register", "release_decode_graphs", "set_cuda_graphs",
           "set_default_cache_options", "unpatch"]
