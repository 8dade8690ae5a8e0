"""`PagedKVCache`: a `transformers.Cache` whose K/V live in fixed-size pages shared by all layers.

One page table per sequence serves every layer (a page id names the same token positions in each layer's pool);
each layer owns a K pool and a V pool [num_pages, page_size, Hkv, D] on the device of the key states it receives,
so models split over devices with accelerate's device_map work unchanged.

Per forward step, the first layer's `update` plans once for the whole step on the host: it learns which new tokens
are left padding (they get no page), allocates page slots through `PageAllocator` (copy-on-write for shared partly
filled pages), and builds the step's `PageLayout`, `q_indptr` and `slot_mapping` in one packed int32 buffer that is
copied once to each device in use. Every layer then only writes its new K/V into its pools (`append_kv`) and returns
a `PagedKVHandle` instead of dense K/V: no host sync and no allocation on the per-layer path.

HF bookkeeping sees what `DynamicCache` would report: `get_seq_length()` is the padded length (left padding
included, the same for every row) because transformers derives masks and positions from it; the number of real
tokens of each sequence is tracked separately (`sequence_lengths`).
"""
from __future__ import annotations

import functools
import os
from array import array
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache_handle import PagedKVHandle
from .growable import GrowableBuffer
from .layout import PageLayout
from .ops import append_kv
from .padding import take_padding_mask
from .patches import POSITIVE_CROP_IS_LENGTH
from .page_allocator import OutOfPagesError, PageAllocator
from .sparse.config import SparseConfig
from .sparse.planner import SparseCachePlanner, SparseStepPlan

# Layer types whose KV this cache can hold: sliding-window layers keep every token and the attention kernel applies
# the window, so they are stored like full-attention layers.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")

# With num_pages=None the pools grow during decoding by at least this many tokens' worth of pages (and at least
# 1/8 of the capacity), so growth happens O(log n) times over a generation without much unused memory. The prompt
# step maps exactly what it needs, and a cache that knows its final length (expected_max_length) grows once to it.
_MIN_GROWTH_TOKENS = 1024
_GROWTH_FRACTION = 8


@dataclass(frozen=True)
class CacheStats:
    """Occupancy of a PagedKVCache. bytes_* count K and V of every layer that has pools."""

    page_size: int
    num_layers: int
    pages_total: int
    pages_used: int
    pages_shared: int
    pages_free: int
    bytes_total: int
    bytes_used: int

    def __str__(self) -> str:
        mib = 1 << 20
        return (f"PagedKVCache: {self.pages_used}/{self.pages_total} pages used ({self.pages_shared} shared, "
                f"{self.pages_free} free), page_size={self.page_size}, {self.num_layers} layers, "
                f"{self.bytes_used / mib:.1f}/{self.bytes_total / mib:.1f} MiB")


@dataclass
class _DeviceStep:
    """The step's metadata on one device: views of one int32 buffer."""

    layout: PageLayout
    q_indptr: torch.Tensor
    slot_mapping: torch.Tensor


@dataclass
class _StepPlan:
    """Everything the layers of one forward step share. `host` packs, in order: row_offsets [B+1], cols [nnz],
    token_counts [nnz], staging_ids [nnz], q_indptr [B+1], slot_mapping [B*S] (int32, pinned when CUDA is used)."""

    batch_size: int
    query_len: int
    padded_len: int
    max_pages_per_seq: int
    nnz: int
    host: torch.Tensor
    layers_done: set[int] = field(default_factory=set)
    per_device: dict[torch.device, _DeviceStep] = field(default_factory=dict)
    sparse: SparseStepPlan | None = None

    def on(self, device: torch.device) -> _DeviceStep:
        """The metadata on `device`, copied there on first use (once per device per step)."""
        step = self.per_device.get(device)
        if step is None:
            buf = self.host if device.type == "cpu" else self.host.to(device, non_blocking=True)
            b, nnz = self.batch_size, self.nnz
            parts = torch.split(buf, [b + 1, nnz, nnz, nnz, b + 1, b * self.query_len])
            step = _DeviceStep(PageLayout(*parts[:4]), parts[4], parts[5])
            self.per_device[device] = step
        return step


def page_count_bucket(pages: int) -> int:
    """The host-side bound on pages per layout row that kernels get: the next power of two (at least 1)."""
    return 1 << max(0, int(pages) - 1).bit_length()


def _int32(values) -> torch.Tensor:
    """A 1-D int32 CPU tensor from an iterable of Python ints (through array, much faster than torch.tensor)."""
    buf = array("i", values)
    return torch.frombuffer(buf, dtype=torch.int32) if len(buf) else torch.empty(0, dtype=torch.int32)


def _device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    raise ValueError(f"PagedKVCache can grow its page pools only on CPU or CUDA devices, not {device}; "
                     "pass num_pages to allocate a fixed pool instead")


class PagedKVLayer(CacheLayerMixin):
    """One layer's K/V page pools. The page tables, reordering and cropping belong to `PagedKVCache` (they are shared
    by all layers); this object holds the pools and the layer's padded length.

    k_pool, v_pool: [num_pages, page_size, Hkv, D] on the layer's device, in the dtype of its key states.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, page_size: int):
        super().__init__()
        self.page_size = page_size
        self.seq_length = 0
        self.k_pool: torch.Tensor | None = None
        self.v_pool: torch.Tensor | None = None
        self._k_buffer: GrowableBuffer | None = None
        self._v_buffer: GrowableBuffer | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype, device and [Hkv, D] from key_states [B, Hkv, S, D]; the pools come with `allocate_pools`."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_kv_heads, self.head_dim = key_states.shape[1], key_states.shape[3]
        if value_states.shape[1] != self.num_kv_heads or value_states.shape[3] != self.head_dim:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} "
                             "need the same number of heads and head dim")
        self.is_initialized = True

    @property
    def page_bytes(self) -> int:
        """Bytes of one page in one pool (K or V)."""
        return self.page_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def reserve_pages(self, max_num_pages: int | None, num_layers: int) -> int:
        """Most pages a growable pool of this layer may ever map (address space reserved up front).

        Default: what fits in device memory when the cache's `num_layers` layers are spread evenly over every device
        of this type (all on one device: exactly the most that can fit), so the limit never binds before memory does.
        """
        if max_num_pages is not None:
            return max_num_pages
        devices = torch.cuda.device_count() if self.device.type == "cuda" else 1
        layers_here = -(-num_layers // max(1, devices))
        return _device_memory_bytes(self.device) // (2 * layers_here * self.page_bytes)

    def allocate_pools(self, num_pages: int, growable: bool, reserve_pages: int,
                       new_buffer=GrowableBuffer) -> None:
        """Create the pools with room for `num_pages` pages: growable ones reserve address space for `reserve_pages`
        pages and map memory on demand; fixed ones are plain tensors."""
        if growable:
            if num_pages > reserve_pages:
                raise OutOfPagesError(
                    f"out of KV-cache pages: the cache already holds {num_pages} pages but this layer's pools on "
                    f"{self.device} can reserve at most {reserve_pages}", needed=num_pages, available=reserve_pages)
            self._k_buffer = new_buffer("k", self.device, reserve_pages * self.page_bytes)
            self._v_buffer = new_buffer("v", self.device, reserve_pages * self.page_bytes)
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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: _StepPlan,
               *args, **kwargs) -> tuple[PagedKVHandle, PagedKVHandle]:
        """Write the step's new tokens into the pools and return the handle (twice, as HF unpacks key, value).

        key_states, value_states [B, Hkv, S, D]: token (b, s) goes to slot_mapping[b * S + s] (skipped when < 0).
        """
        meta = step.on(key_states.device)
        b, hkv, s, d = key_states.shape
        # [B, Hkv, S, D] -> [B*S, Hkv, D]: a view when S == 1 or the states are [B, S, Hkv, D] in memory (HF's usual
        # transpose of the projection), otherwise one copy.
        k = key_states.transpose(1, 2).reshape(b * s, hkv, d)
        v = value_states.transpose(1, 2).reshape(b * s, hkv, d)
        append_kv(self.k_pool, self.v_pool, k, v, meta.slot_mapping)
        self.seq_length = step.padded_len
        handle = PagedKVHandle(self.k_pool, self.v_pool, meta.layout, meta.q_indptr, max_q_len=s,
                               max_pages_per_seq=step.max_pages_per_seq)
        return handle, handle

    def get_seq_length(self) -> int:
        """Padded length (left padding included) of the tokens this layer has seen, as DynamicLayer reports it."""
        return self.seq_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget the length; the pools stay allocated for reuse (their pages were returned by the cache)."""
        self.seq_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Shorten the layer's padded length; the pages themselves are released by PagedKVCache.crop."""
        self.seq_length = max(0, self.seq_length - tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Nothing per layer: PagedKVCache.reorder_cache permutes the shared page tables."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Nothing per layer: PagedKVCache shares the pages through the shared page tables."""

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Nothing per layer: PagedKVCache selects rows of the shared page tables."""


class PagedKVCache(Cache):
    """A transformers `Cache` that stores K/V in pages of `page_size` tokens, shared by all layers.

    config: the model's config (its decoder text config gives the number of layers).
    page_size: tokens per page.
    num_pages: a hard budget of pages (pools allocated in full when a layer first sees K/V). None: capacity grows on
        demand without copying pages already written (pools reserve address space and map memory as needed).
    max_num_pages: with num_pages=None, the most pages the pools may grow to (default: as many as the device memory
        could hold for all layers; see PagedKVLayer.reserve_pages).
    pool_arena: with num_pages=None, where growable pools come from (flashcore_hf.decode_graphs.PoolArena: memory
        kept for the model's next cache, so its CUDA graphs replay without re-capture); None: fresh memory.
    expected_max_length: with num_pages=None, the length (tokens per sequence, padding included) the sequences are
        expected to reach, e.g. generate()'s max_length. The first growth after the prompt maps pages for that
        length at once, so a generation grows its pools (and re-captures decode CUDA graphs) once.
    sparse: sparse page selection for decode steps (flashcore_hf.sparse.SparseConfig); None or policy "dense": every
        step reads every page.

    Running out of pages raises OutOfPagesError (a RuntimeError) and leaves the cache as it was before the step.
    `update` returns a PagedKVHandle (as both key and value) for the "flashcore" attention function; left-padding
    tokens (attention-mask 0) take no page and are never attended.
    """

    def __init__(self, config, page_size: int = 64, num_pages: int | None = None, *,
                 max_num_pages: int | None = None, expected_max_length: int | None = None,
                 sparse: SparseConfig | None = None, pool_arena=None):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_pages is not None and num_pages < 0:
            raise ValueError(f"num_pages must be >= 0 or None, got {num_pages}")
        if num_pages is not None and max_num_pages is not None:
            raise ValueError("max_num_pages only applies to a growable cache (num_pages=None)")
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
        unsupported = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
        if unsupported:
            raise ValueError(f"PagedKVCache stores attention K/V only; this model has layer types {unsupported} "
                             f"(supported: {list(SUPPORTED_LAYER_TYPES)})")
        super().__init__(layers=[PagedKVLayer(page_size) for _ in layer_types])
        self.page_size = int(page_size)
        self._growable = num_pages is None
        self._max_num_pages = max_num_pages
        self._expected_max_length = expected_max_length
        self._arena = pool_arena if pool_arena is not None and num_pages is None and pool_arena.lease(self) else None
        self.allocator = PageAllocator(0 if num_pages is None else num_pages, page_size)
        self._rows: list[int] = []      # allocator sequence id of each batch row
        self._padded_len = 0            # columns seen so far, padding included (the same for every row)
        self._step: _StepPlan | None = None
        self.sparse = SparseConfig() if sparse is None else sparse
        sliding_everywhere = getattr(text_config, "layer_types", None) is None and bool(
            getattr(text_config, "sliding_window", None)) and getattr(text_config, "use_sliding_window", True)
        planner = SparseCachePlanner(self.sparse, layer_types, self.page_size, sliding_everywhere,
                                     self._new_bounds_buffer)
        self._sparse = planner if planner.active else None

    # ---- the per-layer entry point ----------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[PagedKVHandle, PagedKVHandle]:
        """Store the new tokens of layer `layer_idx` and return its PagedKVHandle (as key and value).

        key_states, value_states [B, Hkv, S, D]. attention_mask: optional 2-D padding mask [B, past + S] (any width
        >= S: its last S columns are the new tokens; 1/True = real token) for direct use; without it the first layer
        of a step takes the mask stashed by the flashcore mask function (`padding.take_padding_mask`), None meaning
        no padding. Only left padding is supported: in each row, padding comes before the row's first real token.
        """
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(f"layer_idx {layer_idx} out of range for a cache of {len(self.layers)} layers")
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise ValueError(f"key_states and value_states must both be [B, Hkv, S, D], got "
                             f"{tuple(key_states.shape)} and {tuple(value_states.shape)}")
        batch_size, query_len = key_states.shape[0], key_states.shape[2]
        step = self._step
        if step is None or layer_idx in step.layers_done:  # the first layer of a new forward step
            stashed = take_padding_mask()
            mask = attention_mask if attention_mask is not None else stashed
            step = self._plan_step(batch_size, query_len, mask, key_states.device)
            self._step = step
        elif (batch_size, query_len) != (step.batch_size, step.query_len):
            raise ValueError(f"layer {layer_idx} got {batch_size} sequences x {query_len} tokens but this step was "
                             f"planned for {step.batch_size} x {step.query_len}")
        step.layers_done.add(layer_idx)
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if layer.k_pool is None:
            reserve = layer.reserve_pages(self._max_num_pages, len(self.layers)) if self._growable else 0
            layer.allocate_pools(self.allocator.num_pages, self._growable, reserve,
                                 functools.partial(self._new_pool_buffer, layer_idx))
        handle, _ = layer.update(key_states, value_states, step)
        if step.sparse is not None:
            handle = self._sparse.layer_handle(layer_idx, handle, step.sparse,
                                               step.on(key_states.device).slot_mapping)
        return handle, handle

    # ---- planning (once per forward step) ---------------------------------------------------------------------

    def _plan_step(self, batch_size: int, query_len: int, mask: torch.Tensor | None,
                   device: torch.device) -> _StepPlan:
        past = self._padded_len
        counts = self._new_token_counts(batch_size, query_len, mask)
        if past == 0 and len(self._rows) != batch_size:
            for seq_id in self._rows:  # all empty: a new batch starts
                self.allocator.free(seq_id)
            self._rows = [self.allocator.new_sequence() for _ in range(batch_size)]
        elif len(self._rows) != batch_size:
            raise ValueError(f"the cache holds {len(self._rows)} sequences but got a batch of {batch_size}; "
                             "use reorder_cache / batch_select_indices / batch_repeat_interleave, or reset()")
        lengths = [self.allocator.length(r) for r in self._rows]
        if any(n and c != query_len for c, n in zip(counts, lengths)):
            raise ValueError("PagedKVCache supports left padding only: a row that already has real tokens got "
                             "padding among its new tokens")

        needed = self.allocator.pages_needed(self._rows, counts)
        if needed > self.allocator.num_free:
            self._grow_or_raise(needed)
        appended = self.allocator.append(self._rows, counts)
        if appended.copies:
            self._copy_pages(appended.copies)
        self._padded_len = past + query_len

        slot_mapping = [-1] * (batch_size * query_len)
        for b, slots in enumerate(appended.slots):
            end = (b + 1) * query_len
            slot_mapping[end - len(slots):end] = slots
        layout, max_pages = self._plan_layout()
        # The kernels size their grid (and the decode kernel its split-KV plan) from this bound. Rounding it up to a
        # power of two makes eager steps and CUDA-graph replays (which need a fixed bound) run the very same plan,
        # so both give bit-identical results; the kernels skip the pages a row does not have.
        max_pages_per_seq = page_count_bucket(max_pages)
        q_indptr = torch.arange(batch_size + 1, dtype=torch.int32) * query_len
        parts = [*layout, q_indptr, _int32(slot_mapping)]
        host = torch.empty(sum(p.numel() for p in parts), dtype=torch.int32, pin_memory=device.type == "cuda")
        torch.cat(parts, out=host)
        sparse = None
        if self._sparse is not None:
            sparse = self._sparse.plan_step(lengths, [n + c for n, c in zip(lengths, counts)],
                                            [self.allocator.page_table(r) for r in self._rows], query_len,
                                            max_pages_per_seq, pin=device.type == "cuda")
        return _StepPlan(batch_size, query_len, self._padded_len, max_pages_per_seq, layout.cols.numel(), host,
                         sparse=sparse)

    def _new_token_counts(self, batch_size: int, query_len: int, mask: torch.Tensor | None) -> list[int]:
        """Real (unpadded) tokens among each row's `query_len` new tokens, from the last columns of a 2-D mask.

        Once every row holds real tokens, left padding forces the new columns to be ones, so the mask is not read:
        decode steps cost no host sync. Otherwise its new columns are copied to the host (one sync per step).
        """
        if mask is None:
            return [query_len] * batch_size
        if mask.dim() != 2 or mask.shape[0] != batch_size or mask.shape[1] < query_len:
            raise ValueError(f"attention_mask must be 2-D [batch={batch_size}, past + {query_len} new tokens], "
                             f"got {tuple(mask.shape)}")
        if self._rows and all(self.allocator.length(r) for r in self._rows):
            return [query_len] * batch_size
        new = mask[:, mask.shape[1] - query_len:].to("cpu", torch.bool)
        counts = new.sum(dim=1)
        left_padded = torch.arange(query_len) >= (query_len - counts)[:, None]
        if not torch.equal(new, left_padded):
            raise ValueError("PagedKVCache supports left padding only: in each row of attention_mask the zeros "
                             "must come before the ones")
        return counts.tolist()

    def _plan_layout(self) -> tuple[PageLayout, int]:
        """The step's PageLayout on the host (CPU int32 tensors) and the most pages any sequence reads.

        The one place that decides which pages each sequence reads; a sparse page-selection policy replaces this.
        Dense: every page of every sequence, in token order, all resident. Built straight from the page tables in
        O(pages) (equal to `ops.build_layout` over the per-token page ids, which would cost O(tokens) per step).
        """
        page_size = self.page_size
        row_offsets, cols, counts = [0], [], []
        for seq_id in self._rows:
            pages, n = self.allocator.page_table(seq_id), self.allocator.length(seq_id)
            if pages:
                cols.extend(pages)
                counts.extend([page_size] * (len(pages) - 1))
                counts.append(n - (len(pages) - 1) * page_size)
            row_offsets.append(len(cols))
        max_pages = max((row_offsets[i + 1] - row_offsets[i] for i in range(len(self._rows))), default=0)
        layout = PageLayout(_int32(row_offsets), _int32(cols), _int32(counts),
                            torch.full((len(cols),), -1, dtype=torch.int32))
        return layout, max_pages

    def _grow_or_raise(self, needed: int) -> None:
        """Make `needed` pages free by growing every pool, or raise OutOfPagesError with nothing changed."""
        free, capacity = self.allocator.num_free, self.allocator.num_pages
        if not self._growable:
            raise OutOfPagesError(
                f"out of KV-cache pages: this step needs {needed} free page(s) of {self.page_size} tokens but only "
                f"{free} of the cache's {capacity} pages are free; free pages (crop, reset, fewer sequences) or "
                f"create PagedKVCache with a larger num_pages", needed=needed, available=free)
        shortfall = needed - free
        pooled = [layer for layer in self.layers if layer.k_pool is not None]
        limits = [layer.reserve_pages(self._max_num_pages, len(self.layers)) for layer in pooled]
        if self._max_num_pages is not None:
            limits.append(self._max_num_pages)
        limit = min(limits, default=None)
        if self._padded_len == 0:  # the prompt: exactly what it needs
            target = capacity + shortfall
        elif self._expected_max_length is not None:  # straight to the expected final length
            pages_per_row = -(-self._expected_max_length // self.page_size)
            target = max(capacity + shortfall, len(self._rows) * pages_per_row)
        else:
            target = capacity + max(shortfall, capacity // _GROWTH_FRACTION,
                                    -(-_MIN_GROWTH_TOKENS // self.page_size))
        if limit is not None:
            target = min(target, limit)
        if target < capacity + shortfall:
            raise OutOfPagesError(
                f"out of KV-cache pages: this step needs {needed} free page(s) of {self.page_size} tokens; {free} "
                f"are free and the pools can grow to at most {limit} pages (now {capacity}); raise max_num_pages or "
                f"free pages (crop, reset, fewer sequences)", needed=needed, available=free + limit - capacity)
        error = None
        for attempt in dict.fromkeys((target, capacity + shortfall)):  # try generous growth, then the minimum
            try:
                for layer_idx, layer in enumerate(self.layers):
                    if layer.k_pool is not None:
                        layer.grow(attempt)
                        if self._sparse is not None:
                            self._sparse.fit_summaries(layer_idx, layer.k_pool)
            except (RuntimeError, MemoryError) as err:  # pools grown so far stay larger than needed: harmless
                error = err
                continue
            self.allocator.add_pages(attempt - capacity)
            return
        raise OutOfPagesError(
            f"out of KV-cache pages: this step needs {needed} free page(s) of {self.page_size} tokens; {free} are "
            f"free and mapping memory for {capacity + shortfall} pages failed: {error}",
            needed=needed, available=free) from error

    def _copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy each (source, destination) page in every layer's pools."""
        src, dst = (torch.tensor(ids, dtype=torch.int64) for ids in zip(*copies))
        on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer_idx, layer in enumerate(self.layers):
            if layer.k_pool is None:
                continue
            dev = layer.k_pool.device
            if dev not in on_device:
                on_device[dev] = (src.to(dev), dst.to(dev))
            layer.copy_pages(*on_device[dev])
            if self._sparse is not None:
                self._sparse.copy_page_bounds(layer_idx, layer.k_pool, *on_device[dev])

    # ---- batch-level operations (between steps) ---------------------------------------------------------------

    def _select_rows(self, indices: list[int]) -> None:
        """New rows = old rows at `indices` (repeats share pages by reference count); unreferenced pages are freed."""
        n = len(self._rows)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"row indices {bad[:5]} out of range for a cache of {n} sequences")
        self._step = None
        if indices == list(range(n)):
            return
        new_rows = [self.allocator.fork(self._rows[i]) for i in indices]
        for seq_id in self._rows:
            self.allocator.free(seq_id)
        self._rows = new_rows

    # ---- CUDA-graph decode (flashcore_hf/decode_graphs.py) ------------------------------------------------------

    def _new_pool_buffer(self, layer_idx: int, role: str, device: torch.device, reserve_bytes: int) -> GrowableBuffer:
        """Backing memory of one growable pool: from the pool arena when this cache holds one, else fresh."""
        if self._arena is not None:
            return self._arena.buffer((layer_idx, role), device, reserve_bytes)
        return GrowableBuffer(device, reserve_bytes)

    def _new_bounds_buffer(self, layer_idx: int, device: torch.device, row_bytes: int) -> GrowableBuffer | None:
        """Backing memory of a sparse layer's page key bounds (flashcore_hf.sparse.PageKeySummaries, one row of
        `row_bytes` per page + 1): growable at a fixed address like the pools (from the pool arena when this cache
        holds one); None with fixed-size pools (a plain tensor then)."""
        layer = self.layers[layer_idx]
        if not self._growable or layer._k_buffer is None:
            return None
        rows = layer._k_buffer.reserved_bytes // layer.page_bytes + 1
        return self._new_pool_buffer(layer_idx, "key_bounds", device, rows * row_bytes)

    def fixed_decode_step_blocker(self, batch_size: int, device: torch.device) -> str | None:
        """Why a decode step of `batch_size` rows cannot run from fixed device buffers (a CUDA-graph replay), or None
        when it can: the rows all hold tokens (no padding left to decide) and every layer has its pools on
        `device`. (Pools and page key bounds keep their addresses while they grow, or are re-keyed: device_buffers.)"""
        if len(self._rows) != batch_size:
            return f"the cache holds {len(self._rows)} rows for a batch of {batch_size}"
        if any(self.allocator.length(r) == 0 for r in self._rows):
            return "a row holds no token yet"
        if not all(layer.k_pool is not None and layer.k_pool.device == device for layer in self.layers):
            return f"not every layer's pools are on {device}"
        return None

    def device_buffers(self) -> tuple[tuple[int, int], ...]:
        """(address, bytes) of every device buffer a captured decode step reads or writes besides its own inputs:
        each layer's pools and, with sparse selection, its page key bounds. A replay is valid only for these."""
        tensors = [t for layer in self.layers for t in (layer.k_pool, layer.v_pool) if t is not None]
        if self._sparse is not None:
            tensors += self._sparse.device_buffers()
        return tuple((t.data_ptr(), t.numel() * t.element_size()) for t in tensors)

    def plan_decode_step(self, device: torch.device) -> _StepPlan:
        """Host half of a decode step (one new token per row): page allocation and the step's page lists, with no
        device work. A CUDA-graph replay copies the plan into its fixed buffers (`_StepPlan.host` packs them).
        Raises OutOfPagesError like `update`."""
        return self._plan_step(len(self._rows), 1, None, device)

    def begin_fixed_step(self, device_step: _DeviceStep, padded_len: int, max_pages_per_seq: int) -> None:
        """Make the next forward's layers take `device_step` (fixed device buffers of a CUDA graph) as the step's
        metadata instead of planning one; what the buffers hold when the graph replays is what counts."""
        device = device_step.q_indptr.device
        sparse = None if self._sparse is None else self._sparse.fixed_decode_plan(max_pages_per_seq)
        self._step = _StepPlan(device_step.q_indptr.numel() - 1, 1, padded_len, max_pages_per_seq,
                               device_step.layout.cols.numel(), host=None, per_device={device: device_step},
                               sparse=sparse)

    def finish_replayed_step(self, plan: _StepPlan) -> None:
        """Host bookkeeping of a step whose layers ran inside a graph replay (their Python code did not run)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.seq_length = plan.padded_len
        self._step = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes old row beam_idx[i]. Page tables are permuted; pages are shared, not copied."""
        self._select_rows(torch.as_tensor(beam_idx).tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row `repeats` times in place (rows share their pages)."""
        self._select_rows([i for i in range(len(self._rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows at `indices` (int indices or a bool mask), in that order."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select_rows(indices.tolist())

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` padded positions (tokens_to_remove <= 0) and free their pages.

        A positive value is the padded length to keep on transformers < 5.18 (its deprecated meaning) and an error
        on later versions, as with DynamicCache.
        """
        tokens_to_remove = int(tokens_to_remove)
        if tokens_to_remove > 0:
            if not POSITIVE_CROP_IS_LENGTH:
                raise ValueError(
                    f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                    "Please use a negative integer to remove that number of tokens from the cache instead.")
            if tokens_to_remove >= self._padded_len:
                return
            tokens_to_remove = tokens_to_remove - self._padded_len
        if tokens_to_remove == 0:
            return
        remove = -tokens_to_remove
        self._step = None
        # Left padding: a row's real tokens are the last columns, so the removed columns take min(remove, real).
        for seq_id in self._rows:
            self.allocator.truncate(seq_id, max(0, self.allocator.length(seq_id) - remove))
        self._padded_len = max(0, self._padded_len - remove)
        for layer in self.layers:
            layer.crop(remove)

    def reset(self) -> None:
        """Empty the cache: every page goes back to the free list; pools stay allocated for reuse."""
        for seq_id in self._rows:
            self.allocator.free(seq_id)
        self._rows = []
        self._padded_len = 0
        self._step = None
        for layer in self.layers:
            layer.reset()

    # ---- reporting --------------------------------------------------------------------------------------------

    def sequence_lengths(self) -> list[int]:
        """Real (unpadded) tokens stored for each row."""
        return [self.allocator.length(r) for r in self._rows]

    def page_table(self, row: int) -> list[int]:
        """Pages of row `row` in token order (a copy)."""
        return list(self.allocator.page_table(self._rows[row]))

    def stats(self) -> CacheStats:
        """Pages total/used/shared/free, bytes total/used (K and V of every layer with pools)."""
        alloc = self.allocator
        page_bytes = sum(2 * layer.page_bytes for layer in self.layers if layer.k_pool is not None)
        return CacheStats(page_size=self.page_size, num_layers=len(self.layers), pages_total=alloc.num_pages,
                          pages_used=alloc.num_used, pages_shared=alloc.num_shared, pages_free=alloc.num_free,
                          bytes_total=alloc.num_pages * page_bytes, bytes_used=alloc.num_used * page_bytes)

    @property
    def batch_size(self) -> int:
        return len(self._rows) if self._rows else -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    def __repr__(self) -> str:
        stats = self.stats()
        return (f"PagedKVCache(page_size={self.page_size}, num_layers={stats.num_layers}, "
                f"sequences={len(self._rows)}, pages_used={stats.pages_used}/{stats.pages_total})")
