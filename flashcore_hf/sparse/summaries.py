"""`PageKeySummaries`: the per-page statistics "topk" scores with: element-wise min/max of each page's keys and,
for `scoring="signs"`, the sign bits of every key.

For a page with keys k_1..k_n (one kv head), max_d and min_d over the page's valid tokens bound any query's score:
q.k_i <= sum_d max(q_d * min_d, q_d * max_d) for every i (Quest). Splitting q into its positive and negative parts
turns the bound into one dot product: sum_d relu(q_d) * max_d + min(q_d, 0) * min_d = [relu(q), min(q, 0)] . [max, min].
The sign bits (bit d of key i: k_i,d > 0) refine this per key: k_i is estimated by max_d where it is positive and
min_d elsewhere (scored by the select_pages kernels, flashcore_hf/ops).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..ops import append_kv

# Pages gathered per chunk while refreshing (bounds the temporary copy of a long prefill's pages to
# _REFRESH_CHUNK_ELEMENTS elements of the pool's dtype).
_REFRESH_CHUNK_ELEMENTS = 1 << 24


class PageKeySummaries:
    """Per-page key bounds (and optionally key sign bits) of one layer.

    bounds [num_pages, Hkv, 2 * D] on the layer's device. Row p belongs to physical page p: [..., :D] is the
    element-wise max and [..., D:] the element-wise min of the page's valid keys per kv head (a crop recomputes the
    pages it cut, except pages other rows still share, whose bounds stay wider: still an upper bound). Only rows of
    written pages are meaningful, and every page a sequence holds was written (copy-on-write copies carry their rows
    along), so selection reads fresh bounds.
    dtype: bfloat16 for bfloat16 pools (min/max of bf16 keys are exact in bf16 and scoring reads half the bytes),
    float32 otherwise (float16 products could overflow).

    signs [num_pages, Hkv, P, ceil(D / 8)] uint8 when keep_signs (else None): bit b of byte j of [page, h, t] is
    (key t of the page, kv head h, channel 8 j + b) > 0 (`pack_signs`). Entries of tokens past a page's valid count
    are stale and never read as keys (scoring masks them by the page's token count).

    new_buffer: optional (role, device, reserve_bytes) -> GrowableBuffer | None, role "key_bounds" or "key_signs".
    With buffers, `bounds` and `signs` grow in place at fixed addresses (page-major rows, so growth only appends),
    which captured CUDA graphs rely on; without, they are tensors re-allocated (and copied) when the pool grows.
    """

    def __init__(self, new_buffer: Callable | None = None, keep_signs: bool = False):
        self.bounds: torch.Tensor | None = None
        self.signs: torch.Tensor | None = None
        self.keep_signs = keep_signs
        self._new_buffer = new_buffer
        self._buffers: dict[str, object] = {}

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
            if self.signs is not None:
                self.signs.index_copy_(0, pages[start:start + chunk], pack_signs(tokens).transpose(1, 2))

    def append_decode(self, k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
        """Append a decode step's new K/V (k, v [B, Hkv, D], one token per sequence; slot_mapping [B] int32/int64,
        < 0: none) into the layer's pools, widening those pages' bounds by the new keys (or starting them over for a
        page's first token) and writing the keys' sign bits: one kernel (`flashcore_hf.ops.append_kv` with
        key_bounds; fixed shapes and no host data, so CUDA graphs replay it)."""
        self.fit(k_pool)
        append_kv(k_pool, v_pool, k, v, slot_mapping, key_bounds=self.bounds, key_signs=self.signs)

    def copy_pages(self, k_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-on-write copied pages src -> dst [n] int64 of k_pool: bounds[dst] = bounds[src] (signs too)."""
        self.fit(k_pool)
        self.bounds.index_copy_(0, dst, self.bounds.index_select(0, src))
        if self.signs is not None:
            self.signs.index_copy_(0, dst, self.signs.index_select(0, src))

    def fit(self, k_pool: torch.Tensor) -> None:
        """Make `bounds` (and `signs`) cover every page of k_pool. The cache calls this whenever its pools grow,
        before any step runs on the new pages: a CUDA-graph replay runs no Python, so summaries grown only on the
        eager path would leave a replay reading and writing rows that were never mapped."""
        num_pages, page_size, hkv, d = k_pool.shape
        dtype = torch.bfloat16 if k_pool.dtype == torch.bfloat16 else torch.float32
        self.bounds = self._fit_rows("key_bounds", self.bounds, num_pages, (hkv, 2 * d), dtype, k_pool.device)
        if self.keep_signs:
            self.signs = self._fit_rows("key_signs", self.signs, num_pages, (hkv, page_size, -(-d // 8)),
                                        torch.uint8, k_pool.device)

    def _fit_rows(self, role: str, current: torch.Tensor | None, num_pages: int, row_shape: tuple, dtype,
                  device) -> torch.Tensor:
        """`current` ([pages, *row_shape] or None) grown to num_pages rows: in place in its growable buffer when
        there is one, else a new tensor holding the old rows."""
        if current is not None and current.shape[0] >= num_pages:
            return current
        shape = (num_pages, *row_shape)
        row_bytes = math.prod(row_shape) * dtype.itemsize
        if role not in self._buffers and self._new_buffer is not None:
            self._buffers[role] = self._new_buffer(role, device, row_bytes)
        buffer = self._buffers.get(role)
        if buffer is not None:
            if current is None:   # this cache's first rows: an arena's buffer may hold an earlier cache's memory
                buffer.fit(num_pages * row_bytes)
            elif buffer.nbytes < num_pages * row_bytes:
                buffer.grow(num_pages * row_bytes)
            return buffer.view(dtype, shape)
        grown = torch.zeros(shape, dtype=dtype, device=device)
        if current is not None:
            grown[:current.shape[0]] = current
        return grown


def pack_signs(keys: torch.Tensor) -> torch.Tensor:
    """Sign bits of keys [..., D] as [..., ceil(D / 8)] uint8: bit b of byte j is keys[..., 8 j + b] > 0."""
    d = keys.shape[-1]
    bits = keys > 0
    if d % 8:
        bits = torch.nn.functional.pad(bits, (0, 8 - d % 8))
    # Bit weights 1, 2, ..., 128 made on the device (no host data). Distinct powers of two: their uint8 sum is the
    # OR of the bits, with byte-sized intermediates (an int32 shift-and-sum moved 4x the bytes: 4x slower on CPU).
    shifts = torch.arange(8, dtype=torch.uint8, device=keys.device)
    weights = torch.ones(8, dtype=torch.uint8, device=keys.device).bitwise_left_shift_(shifts)
    return (bits.view(*bits.shape[:-1], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def refresh_slots(pages: torch.Tensor, counts: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pages [n] int64, page_slots [n, P] int64) for `PageKeySummaries.refresh` from host-planned pages.

    pages [n]: distinct physical pages written this step; counts [n]: valid tokens on each afterwards (1..P).
    Row i of page_slots is pages_i * P + min(offset, counts_i - 1) for offset 0..P-1.
    """
    offsets = torch.arange(page_size, device=pages.device)
    last = (counts.long() - 1).clamp_(min=0)[:, None]
    pages = pages.long()
    return pages, pages[:, None] * page_size + torch.minimum(offsets, last)
