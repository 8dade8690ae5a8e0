"""FlashCore: sparse paged attention for Hugging Face transformers.

`import flashcore_hf` registers the `flashcore` op library and the `"flashcore"` attention implementation.
"""
from ._ext import HAS_CUDA_KERNELS
from .layout import PageLayout
from .ops import append_kv, build_layout, kernel_supports, paged_attention

__all__ = ["HAS_CUDA_KERNELS", "PageLayout", "append_kv", "build_layout", "kernel_supports", "paged_attention"]
