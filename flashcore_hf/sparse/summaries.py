"""`PageKeySummaries`: element-wise min/max of each page's keys, the per-page statistics "topk" scores with.

For a page with keys k_1..k_n (one kv head), max_d and min_d over the page's valid tokens bound any query's score:
q.k_i <= sum_d max(q_d * min_d, q_d * max_d) for every i (Quest). Splitting q into its positive and negative parts
turns the bound into one dot product: sum_d relu(q_d) * max_d + min(q_d, 0) * min_d = [relu(q), min(q, 0)] . [max, min].
"""
from __future__ import annotations

from typing import Callable

import torch

# Pages gathered per chunk while refreshing (bounds the temporary copy of a long prefill's pages to
# _REFRESH_CHUNK_ELEMENTS elements of the pool's dtype).
_REFRESH_CHUNK_ELEMENTS = 1 << 24


class PageKeySummaries:
    """Per-page key bounds of one layer.

    bounds [num_pages + 1, Hkv, 2 * D] on the layer's device. Row p + 1 belongs to physical page p: [..., :D] is the
    element-wise max and [..., D:] the element-wise min of the page's valid keys per kv head. Row 0 is scratch:
    refreshes with nothing to write (padding rows of a decode step) go there, so every refresh has a fixed shape.
    Only pages refreshed since they were last written hold meaningful values. dtype: bfloat16 for bfloat16 pools
    (min/max of bf16 keys are exact in bf16 and scoring reads half the bytes), float32 otherwise (float16 products
    could overflow).

    new_buffer: optional (device, reserve_bytes) -> GrowableBuffer | None. With a buffer, `bounds` grows in place at
    a fixed address (page-major rows, so growth only appends), which captured CUDA graphs rely on; without one it is
    a tensor re-allocated (and copied) when the pool grows.
    """

    def __init__(self, new_buffer: Callable | None = None):
        self.bounds: torch.Tensor | None = None
        self._new_buffer = new_buffer
        self._buffer = None

    def refresh(self, k_pool: torch.Tensor, rows: torch.Tensor, page_slots: torch.Tensor) -> None:
        """Recompute the bounds of the pages just written, from their valid tokens only.

        k_pool [num_pages, P, Hkv, D]: the layer's key pool after this step's append.
        rows [n] int64: bounds row of each page to refresh (page + 1; 0 = scratch, written and never read).
        page_slots [n, P] int64: pool slots (page * P + offset) of each page's valid tokens, padded by repeating a
            valid one (a repeated key changes neither the min nor the max). See `refresh_slots` and
            `decode_refresh_slots`. A reused page therefore never keeps bounds of its old tokens.
        Grows `bounds` when the pool grew (outside any CUDA graph capture: the first forward after a growth is an
        eager or warm-up one). No host sync.
        """
        self._fit(k_pool)
        num_pages, page_size, hkv, d = k_pool.shape
        keys = k_pool.view(num_pages * page_size, hkv, d)
        chunk = max(1, _REFRESH_CHUNK_ELEMENTS // (page_size * hkv * d))
        for start in range(0, rows.shape[0], chunk):
            slots = page_slots[start:start + chunk]
            tokens = keys.index_select(0, slots.reshape(-1)).view(slots.shape[0], page_size, hkv, d)
            low, high = torch.aminmax(tokens, dim=1)                                     # [n, Hkv, D] each
            self.bounds.index_copy_(0, rows[start:start + chunk], torch.cat([high, low], dim=-1).to(self.bounds.dtype))

    def _fit(self, k_pool: torch.Tensor) -> None:
        """Make `bounds` cover every page of k_pool (+ the scratch row)."""
        num_pages, _, hkv, d = k_pool.shape
        if self.bounds is not None and self.bounds.shape[0] > num_pages:
            return
        dtype = torch.bfloat16 if k_pool.dtype == torch.bfloat16 else torch.float32
        shape = (num_pages + 1, hkv, 2 * d)
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
    """(rows [n] int64, page_slots [n, P] int64) for `PageKeySummaries.refresh` from host-planned pages.

    pages [n]: distinct physical pages written this step; counts [n]: valid tokens on each afterwards (1..P).
    Row i of page_slots is pages_i * P + min(offset, counts_i - 1) for offset 0..P-1.
    """
    offsets = torch.arange(page_size, device=pages.device)
    last = (counts.long() - 1).clamp_(min=0)[:, None]
    pages = pages.long()
    return pages + 1, pages[:, None] * page_size + torch.minimum(offsets, last)


def decode_refresh_slots(slot_mapping: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [T], page_slots [T, P]) for a step of at most one new token per sequence, on the device alone.

    slot_mapping [T] int32: each new token's pool slot (page * P + offset; < 0: no token). The token's page then
    holds offset + 1 valid tokens (pages fill from slot 0). Tokens with no slot refresh the scratch row from slot 0.
    Fixed shapes and no host data: what a CUDA-graph replay of a decode step computes.
    """
    slots = slot_mapping.long()
    valid = slots >= 0
    page = torch.where(valid, slots // page_size, -1)
    offset = torch.where(valid, slots % page_size, 0)
    first = (page * page_size).clamp_(min=0)
    offsets = torch.arange(page_size, device=slots.device)
    return page + 1, first[:, None] + torch.minimum(offsets, offset[:, None])
