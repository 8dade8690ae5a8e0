"""Page pools: the device memory of a paged cache, how it grows, and the arena that keeps it across generate() calls.

Each layer owns a K pool and a V pool [num_pages, page_size, Hkv, D] on the device of the key states it receives.
Growable pools (`PagedKVCache(num_pages=None)`) reserve address space once and map memory on demand
(flashcore_hf.growable.GrowableBuffer), so pages never move and views keep their addresses while the pool grows;
fixed pools are plain tensors.
"""
from __future__ import annotations

import gc
import os
import weakref

import torch

from ..growable import GrowableBuffer
from .allocator import OutOfPagesError

MIN_GROWTH_TOKENS = 1024
"""A growth during decoding maps at least this many tokens' worth of pages (and at least 1/GROWTH_FRACTION of the
capacity), so pools grow O(log n) times over a generation without much unused memory."""
GROWTH_FRACTION = 8


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device (host RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    raise ValueError(f"PagedKVCache can grow its page pools only on CPU or CUDA devices, not {device}; "
                     "pass num_pages to allocate a fixed pool instead")


def device_multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 for any other device."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def growth_target(capacity: int, shortfall: int, *, prompt: bool, expected_pages: int | None,
                  page_size: int) -> int:
    """How many pages the pools should hold after growing by at least `shortfall` pages.

    prompt: the first step (maps exactly what it needs). expected_pages: pages the batch is expected to reach
    (PagedKVCache(expected_max_length=...)): grow straight there, once.
    """
    if prompt:
        return capacity + shortfall
    if expected_pages is not None:
        return max(capacity + shortfall, expected_pages)
    return capacity + max(shortfall, capacity // GROWTH_FRACTION, -(-MIN_GROWTH_TOKENS // page_size))


class LayerPools:
    """One layer's K and V pools. dtype, device, Hkv and D come from the first key states the layer stores."""

    def __init__(self, page_size: int, key_states: torch.Tensor, value_states: torch.Tensor):
        self.page_size = page_size
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_kv_heads, self.head_dim = key_states.shape[1], key_states.shape[3]
        if value_states.shape[1] != self.num_kv_heads or value_states.shape[3] != self.head_dim:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} "
                             "need the same number of heads and head dim")
        self.k_pool: torch.Tensor | None = None
        self.v_pool: torch.Tensor | None = None
        self._k_buffer: GrowableBuffer | None = None
        self._v_buffer: GrowableBuffer | None = None

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in one pool (K or V)."""
        return self.page_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def reserved_pages(self) -> int:
        """Pages a growable pool can ever map (0 for fixed pools)."""
        return 0 if self._k_buffer is None else self._k_buffer.reserved_bytes // self.page_bytes

    def reserve_pages(self, max_num_pages: int | None, num_layers: int) -> int:
        """Most pages a growable pool of this layer may ever map (address space reserved up front).

        Default: what fits in device memory when the cache's `num_layers` layers are spread evenly over every device
        of this type (all on one device: exactly the most that can fit), so the limit never binds before memory does.
        """
        if max_num_pages is not None:
            return max_num_pages
        devices = torch.cuda.device_count() if self.device.type == "cuda" else 1
        layers_here = -(-num_layers // max(1, devices))
        return device_memory_bytes(self.device) // (2 * layers_here * self.page_bytes)

    def allocate(self, num_pages: int, growable: bool, reserve_pages: int, new_buffer=GrowableBuffer) -> None:
        """Create the pools with room for `num_pages` pages: growable ones reserve address space for `reserve_pages`
        pages (new_buffer(role, device, bytes) gives the memory) and map memory on demand; fixed ones are plain
        tensors."""
        if growable:
            if num_pages > reserve_pages:
                raise OutOfPagesError(
                    f"out of KV-cache pages: the cache already holds {num_pages} pages but this layer's pools on "
                    f"{self.device} can reserve at most {reserve_pages}", needed=num_pages, available=reserve_pages)
            self._k_buffer = new_buffer("k", self.device, reserve_pages * self.page_bytes)
            self._v_buffer = new_buffer("v", self.device, reserve_pages * self.page_bytes)
            for buf in (self._k_buffer, self._v_buffer):  # an arena's buffer may hold an earlier tenant's memory
                buf.fit(num_pages * self.page_bytes)
            self.grow(num_pages)
        else:
            shape = (num_pages, self.page_size, self.num_kv_heads, self.head_dim)
            self.k_pool = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.v_pool = torch.empty(shape, dtype=self.dtype, device=self.device)

    def grow(self, num_pages: int) -> None:
        """Map memory for `num_pages` pages in both growable pools; written pages stay where they are."""
        nbytes = num_pages * self.page_bytes
        self._k_buffer.grow(nbytes)
        self._v_buffer.grow(nbytes)
        shape = (num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        self.k_pool = self._k_buffer.view(self.dtype, shape)
        self.v_pool = self._v_buffer.view(self.dtype, shape)

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """pool[dst[i]] = pool[src[i]] in both pools (copy-on-write); src/dst int64 on this layer's device."""
        self.k_pool.index_copy_(0, dst, self.k_pool.index_select(0, src))
        self.v_pool.index_copy_(0, dst, self.v_pool.index_select(0, src))


class PoolArena:
    """Page-pool memory of one model, lent to one PagedKVCache at a time and kept when that cache is gone, so the
    next generate() call gets the same addresses and replays the CUDA graphs captured before (no re-capture).

    A new tenant reuses the memory the previous one mapped (GrowableBuffer.fit): calls of similar sizes map nothing
    again, while a buffer holding more than twice what the tenant's first step needs is released first, so a short
    call after a long one does not keep the long one's memory. While a cache the user kept still holds the arena, a
    new cache gets fresh memory (its graphs are captured for it). `release` frees the address space too.
    """

    def __init__(self):
        self._buffers: dict[tuple, GrowableBuffer] = {}
        self._tenant = None

    def lease(self, cache) -> bool:
        """Lend the arena to `cache` unless another live cache holds it (a cache held only by a reference cycle is
        collected first). The previous tenant's pages are the new tenant's memory: never read before written."""
        if self._tenant is not None and self._tenant() is not None:
            gc.collect()
            if self._tenant() is not None:
                return False
        self._tenant = weakref.ref(cache)
        return True

    def buffer(self, key: tuple, device: torch.device, reserve_bytes: int) -> GrowableBuffer:
        """The arena's buffer for `key` (e.g. (layer, "k")), new if absent or too small for reserve_bytes."""
        buf = self._buffers.get(key)
        if buf is None or buf.device != torch.device(device) or buf.reserved_bytes < reserve_bytes:
            buf = GrowableBuffer(device, reserve_bytes)
            self._buffers[key] = buf
        return buf
