"""The paged KV cache: page manager (allocator.py), pools and their growth (pools.py), one step's plan
(step_plan.py), what update() hands to attention (handles.py), pages kept across generate() calls (prefix.py), and
the transformers Cache adapter (paged_cache.py)."""
from .allocator import AppendResult, OutOfPagesError, PageAllocator
from .handles import PagedKVHandle, PagedLayerStep
from .paged_cache import SUPPORTED_LAYER_TYPES, CacheStats, PagedKVCache, PagedKVLayer
from .pools import PoolArena
from .prefix import PrefixCache, PrefixCacheStats
from .step_plan import StepPlan, page_count_bucket

__all__ = ["AppendResult", "CacheStats", "OutOfPagesError", "PageAllocator", "PagedKVCache", "PagedKVHandle",
           "PagedKVLayer", "PagedLayerStep", "PoolArena", "PrefixCache", "PrefixCacheStats", "SUPPORTED_LAYER_TYPES",
           "StepPlan", "page_count_bucket"]
