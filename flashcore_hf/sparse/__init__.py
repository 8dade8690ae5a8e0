"""Sparse page selection for long-context decode: which pages each sequence (and kv head) reads per step.

`SparseConfig` chooses the policy ("dense", "streaming", "topk"; see flashcore_hf/sparse/config.py); a
`PagedKVCache` applies it. Two ways to turn it on with plain `generate()`:

    import flashcore_hf as fc
    sparse = fc.SparseConfig(policy="topk", token_budget=4096)            # sinks, recent pages, dense layers: defaults

    # 1. per call: pass the cache
    model.generate(ids, **{fc.CACHE_KWARG: fc.PagedKVCache(model.config, sparse=sparse)}, max_new_tokens=256)

    # 2. process-wide: the cache generate() builds by itself for attn_implementation="flashcore" models
    fc.set_default_cache_options(sparse=sparse)
    model.generate(ids, max_new_tokens=256)

Prefill stays dense; decode steps read the selected pages. Selection runs on the device with fixed shapes and no host
sync, and only changes the PageLayout the kernels read (the kernels know nothing about policies).
"""
from .config import SparseConfig
from .selection import (LayerSelector, PaddedPageTable, StepSelection, padded_page_table, step_is_sparse,
                        streaming_layout, topk_layout)
from .summaries import PageKeySummaries, refresh_slots

__all__ = ["LayerSelector", "PaddedPageTable", "PageKeySummaries", "SparseConfig", "StepSelection",
           "padded_page_table", "refresh_slots", "step_is_sparse", "streaming_layout", "topk_layout"]
