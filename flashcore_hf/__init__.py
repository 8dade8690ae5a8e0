"""FlashCore: sparse paged attention for Hugging Face transformers.

`import flashcore_hf` registers the `flashcore` op library and the `"flashcore"` attention implementation
(`AutoModelForCausalLM.from_pretrained(path, attn_implementation="flashcore")`), applying the transformers patches
that implementation needs (flashcore_hf.patches).

Layers, each importing only those below it: ops/ (the op library, attention plans, the SDPA fallback) -> cache/
(allocator, pools, step plans, the transformers Cache) and sparse/ (page selection) -> hf/ (attention function,
registration, CUDA-graph decode).
"""
from ._ext import HAS_CUDA_KERNELS
from .cache import CacheStats, OutOfPagesError, PageAllocator, PagedKVCache, PrefixCache
from .hf import (ATTN_IMPLEMENTATION, FlashCoreAttention, FlashCoreCompileWarning, FlashCoreFallbackWarning,
                 decode_graph_stats, flashcore_attention_forward, flashcore_mask, register, release_decode_graphs,
                 set_compiled_decode, set_compiled_prefill, set_cuda_graphs, set_default_cache_options, unpatch)
from .layout import PageLayout
from .ops import AttentionPlan, append_kv, build_layout, kernel_supports, paged_attention, plan_attention
from .patches import CACHE_KWARG
from .sparse import SparseConfig

register()

__all__ = ["ATTN_IMPLEMENTATION", "AttentionPlan", "CACHE_KWARG", "CacheStats", "FlashCoreAttention",
           "FlashCoreCompileWarning", "FlashCoreFallbackWarning", "HAS_CUDA_KERNELS", "OutOfPagesError",
           "PageAllocator", "PageLayout", "PagedKVCache", "PrefixCache", "SparseConfig", "append_kv", "build_layout",
           "decode_graph_stats", "flashcore_attention_forward", "flashcore_mask", "kernel_supports",
           "paged_attention", "plan_attention", "register", "release_decode_graphs", "set_compiled_decode",
           "set_compiled_prefill", "set_cuda_graphs", "set_default_cache_options", "unpatch"]
