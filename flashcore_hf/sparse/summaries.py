"""`PageKeySummaries`: element-wise min/max of each page's keys, the per-page statistics "topk" scores with.

For a page with keys k_1..k_n (one kv head), max_d and min_d over the page's valid tokens bound any query's score:
q.k_i <= sum_d max(q_d * min_d, q_d * max_d) for every i (Quest). Splitting q into its positive and negative parts
turns the bound into one dot product: sum_d relu(q_d) * max_d + min(q_d, 0) * min_d = [relu(q), min(q, 0)] . [max, min].
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ops import update_page_bounds

# Pages gathered per chunk while refreshing (bounds the temporary copy of a long prefill's pages to
# _REFRESH_CHUNK_ELEMENTS elements of the pool's dtype).
_REFRESH_CHUNK_ELEMENTS = 1 << 24


class PageKeySummaries:
    """Per-page key bounds of one layer.

    bounds [num_pages, Hkv, 2 * D] on the layer's device. Row p belongs to physical page p: [..., :D] is the
    element-wise max and [..., D:] the element-wise min of the page's valid keys per kv head (after a crop that cut a
    page, possibly wider: still an upper bound). Only rows of written pages are meaningful, and every page a
    sequence holds was written (copy-on-write copies carry their rows along), so selection reads fresh bounds. dtype: bfloat16 for bfloat16 pools (min/max of bf16 keys are exact in bf16
    and scoring reads half the bytes), float32 otherwise (float16 products could overflow).

    new_buffer: optional (device, reserve_bytes) -> GrowableBuffer | None. With a buffer, `bounds` grows in place at
    a fixed address (page-major rows, so growth only appends), which captured CUDA graphs rely on; without one it is
    a tensor re-allocated (and copied) when the pool grows.
    """

    def __init__(self, new_buffer: Callable | None = None):
        self.bounds: torch.Tensor | None = None
        self._new_buffer = new_buffer
        self._buffer = None

    def refresh(self, k_pool: torch.Tensor, pages: torch.Tensor, page_slots: torch.Tensor) -> None:
        """Recompute the bounds of the pages just written, from their valid tokens only (any number of new tokens
        per page: prefill and chunked prefill).

        k_pool [num_pages, P, Hkv, D]: the layer's key pool after this step's append.
        pages [n] int64: the pages to refresh.
        page_slots [n, P] int64: pool slots (page * P + offset) of each page's valid tokens, padded by repeating a
            valid one (a repeated key changes neither the min nor the max); see `refresh_slots`. A reused page
            therefore never keeps bounds of its old tokens.
        Grows `bounds` when the pool grew (outside any CUDA graph capture: the first forward after a growth is an
        eager or warm-up one). No host sync.
        """
        self.fit(k_pool)
        num_pages, page_size, hkv, d = k_pool.shape
        keys = k_pool.view(num_pages * page_size, hkv, d)
        chunk = max(1, _REFRESH_CHUNK_ELEMENTS // (page_size * hkv * d))
        for start in range(0, pages.shape[0], chunk):
            slots = page_slots[start:start + chunk]
            tokens = keys.index_select(0, slots.reshape(-1)).view(slots.shape[0], page_size, hkv, d)
            low, high = torch.aminmax(tokens, dim=1)                                     # [n, Hkv, D] each
            self.bounds.index_copy_(0, pages[start:start + chunk],
                                    torch.cat([high, low], dim=-1).to(self.bounds.dtype))

    def update_decode(self, k_pool: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """A decode step wrote one new key per sequence (slot_mapping [B] int32/int64, < 0: none) into k_pool:
        widen those pages' bounds by the new keys, or start them over for a page's first token (one kernel,
        `flashcore_hf.ops.update_page_bounds`; fixed shapes and no host data, so CUDA graphs replay it)."""
        self.fit(k_pool)
        update_page_bounds(self.bounds, k_pool, slot_mapping)

    def copy_pages(self, k_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-on-write copied pages src -> dst [n] int64 of k_pool: bounds[dst] = bounds[src]."""
        self.fit(k_pool)
        self.bounds.index_copy_(0, dst, self.bounds.index_select(0, src))

    def fit(self, k_pool: torch.Tensor) -> None:
        """Make `bounds` cover every page of k_pool. The cache calls this whenever its pools grow, before any step
        runs on the new pages: a CUDA-graph replay runs no Python, so bounds grown only on the eager path would
        leave a replay reading and writing rows that were never mapped."""
        num_pages, _, hkv, d = k_pool.shape
        if self.bounds is not None and self.bounds.shape[0] >= num_pages:
            return
        dtype = torch.bfloat16 if k_pool.dtype == torch.bfloat16 else torch.float32
        shape = (num_pages, hkv, 2 * d)
        row_bytes = hkv * 2 * d * dtype.itemsize
        if self._buffer is None and self._new_buffer is not None:
            self._buffer = self._new_buffer(k_pool.device, row_bytes)
        if self._buffer is not None:
            if self._buffer.nbytes < shape[0] * row_bytes:
                self._buffer.grow(shape[0] * row_bytes)
            self.bounds = self._buffer.view(dtype, shape)
            return
        grown = torch.zeros(shape, dtype=dtype, device=k_pool.device)
        if self.bounds is not None:
            grown[:self.bounds.shape[0]] = self.bounds
        self.bounds = grown


def refresh_slots(pages: torch.Tensor, counts: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pages [n] int64, page_slots [n, P] int64) for `PageKeySummaries.refresh` from host-planned pages.

    pages [n]: distinct physical pages written this step; counts [n]: valid tokens on each afterwards (1..P).
    Row i of page_slots is pages_i * P + min(offset, counts_i - 1) for offset 0..P-1.
    """
    offsets = torch.arange(page_size, device=pages.device)
    last = (counts.long() - 1).clamp_(min=0)[:, None]
    pages = pages.long()
    return pages, pages[:, None] * page_size + torch.minimum(offsets, last)
