"""What `PagedKVCache.update` hands to the attention function instead of dense K/V."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import PageLayout


@dataclass
class PagedKVHandle:
    """One layer's view of the paged cache for the current forward step.

    HF attention modules do `key, value = cache.update(...)`; the paged cache returns this same object twice.
    The attention function recognises it and calls `paged_attention` on the pools with the step's layout.

    k_cache, v_cache: [num_pages, page_size, Hkv, D] pools of this layer (on the layer's device).
    layout: the step's PageLayout (pages each sequence reads, on the layer's device).
    q_indptr: [B + 1] int32, queries of sequence b are rows q_indptr[b]:q_indptr[b+1] of the packed query
        [B * S_q, Hq, D] (every row has S_q queries; left-padding queries are computed and ignored).
    max_q_len, max_pages_per_seq: host-known upper bounds for grid sizing (no device sync).
    workspace: optional preallocated float32 buffer for split-KV partials (graph capture).
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    layout: PageLayout
    q_indptr: torch.Tensor
    max_q_len: int
    max_pages_per_seq: int
    workspace: torch.Tensor | None = None
