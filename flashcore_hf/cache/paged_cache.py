"""`PagedKVCache`: a `transformers.Cache` whose K/V live in fixed-size pages shared by all layers.

This module is the transformers adapter; the parts live beside it: the page manager (allocator.py), the pools and
their growth (pools.py), a step's plan (step_plan.py) and what update() returns (handles.py).

One page table per sequence serves every layer (a page id names the same token positions in each layer's pool);
each layer owns a K pool and a V pool on the device of the key states it receives, so models split over devices
with accelerate's device_map work unchanged.

A forward step is planned once, on the host, at its first layer: which of the new tokens are padding (a 2-D mask
may mark any of them: they take no page), page slots through `PageAllocator` (copy-on-write for shared partly filled
pages), and the step's layouts and query runs (step_plan.py), packed in one int32 buffer copied once to each device.
Every layer then writes its new K/V into its pools (`append_kv`) and attention reads the pages: no host sync and no
allocation on the per-layer path. Padding is only known to the attention function (it receives the mask), so
`update` returns a handle that the attention function resolves with the mask (handles.py).

HF bookkeeping sees what `DynamicCache` would report: `get_seq_length()` is the padded length (padding included,
the same for every row) because transformers derives masks and positions from it; the real tokens of each sequence
are tracked separately (`sequence_lengths`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..growable import GrowableBuffer
from ..ops import append_kv
from ..patches import POSITIVE_CROP_IS_LENGTH
from ..sparse.config import SparseConfig
from ..sparse.planner import SparseCachePlanner
from ..sparse.summaries import refresh_slots
from .allocator import OutOfPagesError, PageAllocator
from .handles import LayerWrite, PagedKVHandle, PagedLayerStep
from .pools import LayerPools, device_multiprocessors, growth_target
from .prefix import PrefixCache
from .step_plan import (FULL, PREFIX, SUFFIX, WINDOW, DeviceStep, StepPlan, StepShape, build_layouts,
                        cascade_layouts, int32, page_count_bucket, prefix_splits, query_runs, shared_prefixes,
                        window_page_bound)

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
"""Layer types whose KV this cache can hold: sliding-window layers keep every token (windows are applied by reading
only the pages inside them), so they are stored like full-attention layers."""


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


class PagedKVLayer(CacheLayerMixin):
    """One layer of a PagedKVCache as transformers sees it: its pools (`pools`, made from the first key states it
    stores) and its padded length. Page tables, reordering and cropping belong to PagedKVCache (shared by all
    layers)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, page_size: int):
        super().__init__()
        self.page_size = page_size
        self.seq_length = 0
        self.pools: LayerPools | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype, device and [Hkv, D] from key_states [B, Hkv, S, D]; memory comes with `pools.allocate`."""
        self.pools = LayerPools(self.page_size, key_states, value_states)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    @property
    def k_pool(self) -> torch.Tensor | None:
        return None if self.pools is None else self.pools.k_pool

    @property
    def v_pool(self) -> torch.Tensor | None:
        return None if self.pools is None else self.pools.v_pool

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise TypeError("a PagedKVLayer's K/V are written through PagedKVCache.update, which plans the step for every "
                        "layer (the page tables are shared)")

    def get_seq_length(self) -> int:
        """Padded length (padding included) of the tokens this layer has seen, as DynamicLayer reports it."""
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

    config: the model's config (its decoder text config gives the number of layers, layer types and the sliding
        window of window layers).
    page_size: tokens per page.
    num_pages: a hard budget of pages (pools allocated in full when a layer first sees K/V). None: capacity grows on
        demand without copying pages already written (pools reserve address space and map memory as needed).
    max_num_pages: with num_pages=None, the most pages the pools may grow to (default: as many as the device memory
        could hold for all layers; see LayerPools.reserve_pages).
    pool_arena: with num_pages=None, where growable pools come from (flashcore_hf.cache.pools.PoolArena: memory kept
        for the model's next cache, so its CUDA graphs replay without re-capture); None: fresh memory.
    expected_max_length: with num_pages=None, the length (tokens per sequence, padding included) the sequences are
        expected to reach, e.g. generate()'s max_length. The first growth after the prompt maps pages for that
        length at once, so a generation grows its pools (and re-captures decode CUDA graphs) once.
    sparse: sparse page selection for decode steps (flashcore_hf.sparse.SparseConfig); None or policy "dense": every
        step reads every page.
    prefix_cache: a flashcore_hf.PrefixCache (prefix.py) kept across generate() calls: a prompt (without padding)
        that starts with pages an earlier prompt left there gets them copied in and prefills only the rest; the
        prompt's full pages are kept for later calls. None: every prompt is prefilled whole. Not used with sparse
        selection (its page summaries are made while pages are written).
    share_prefixes: rows that hold the same prompt share its pages and read them once per decode step: generate()
        prefills each distinct prompt row once (patches/shared_prefill.py) and decode steps whose rows start with the
        same pages run as a cascade (step_plan.py). False: every row is prefilled and read on its own (forks by
        beam search reordering still share pages).

    Running out of pages raises OutOfPagesError (a RuntimeError) and leaves the cache as it was before the step.
    `update` returns a PagedKVHandle (as both key and value) for the "flashcore" attention function, which resolves it
    with the step's padding mask; padding tokens (attention-mask 0: left, right or holes) take no page and are never
    attended.
    """

    def __init__(self, config, page_size: int = 64, num_pages: int | None = None, *,
                 max_num_pages: int | None = None, expected_max_length: int | None = None,
                 sparse: SparseConfig | None = None, share_prefixes: bool = True,
                 prefix_cache: PrefixCache | None = None, pool_arena=None):
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
        self._rows: list[int] = []                     # allocator sequence id of each batch row
        self._pads: list[list[tuple[int, int]]] = []   # each row's padding columns, as [start, end) intervals
        self._padded_len = 0                           # columns seen so far, padding included (same for every row)
        self._step: StepPlan | None = None
        self._pending: PagedKVHandle | None = None     # handed out by update(), not written yet
        self._held_write: LayerWrite | None = None      # the last layer's write held back to run beside its selection
        self._next_decode: tuple[StepPlan, torch.device] | None = None   # prepare_next_decode_step's plan
        windowed = bool(getattr(text_config, "sliding_window", None)) and getattr(
            text_config, "use_sliding_window", True) is not False
        self.window: int | None = int(text_config.sliding_window) if windowed else None
        """The sliding window of the model's window layers (they read only the pages inside it), or None."""
        self._num_q_heads = int(getattr(text_config, "num_attention_heads", 0) or 0)
        self.sparse = SparseConfig() if sparse is None else sparse
        self.share_prefixes = bool(share_prefixes)
        if prefix_cache is not None and not isinstance(prefix_cache, PrefixCache):
            raise TypeError(f"prefix_cache must be a flashcore_hf.PrefixCache, got {type(prefix_cache).__name__}")
        self.prefix_cache = prefix_cache
        sliding_everywhere = getattr(text_config, "layer_types", None) is None and windowed
        planner = SparseCachePlanner(self.sparse, layer_types, self.page_size, sliding_everywhere,
                                     self._new_summary_buffer)
        self._sparse = planner if planner.active else None

    # ---- the per-layer entry points ---------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               attention_mask: torch.Tensor | None = None, **kwargs):
        """Hand the new tokens of layer `layer_idx` to the attention function (as key and value).

        key_states, value_states [B, Hkv, S, D]. Inside a model: returns a PagedKVHandle, which the flashcore
        attention function resolves with the forward's padding mask (handles.py). attention_mask given (2-D
        [B, >= S], its last S columns the new tokens, 1/True = real): the K/V are written now and the
        PagedLayerStep is returned.
        """
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(f"layer_idx {layer_idx} out of range for a cache of {len(self.layers)} layers")
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise ValueError(f"key_states and value_states must both be [B, Hkv, S, D], got "
                             f"{tuple(key_states.shape)} and {tuple(value_states.shape)}")
        self.flush()
        handle = PagedKVHandle(self, layer_idx, key_states, value_states)
        if attention_mask is not None:
            step = handle.resolve(attention_mask)
            return step, step
        self._pending = handle
        return handle, handle

    def flush(self) -> None:
        """Write what update() handed out and nobody resolved yet, as tokens without padding (a direct caller of
        update; inside a model the attention function resolves it with the mask first), and undo a decode step
        planned ahead that did not come (prepare_next_decode_step). Every other operation of the cache calls this
        first, so the cache never looks as if those tokens were missing or the planned ones were there."""
        self._cancel_next_decode()
        self._write_pending()

    def _write_pending(self) -> None:
        held, self._held_write = self._held_write, None
        if held is not None:
            held.run()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.resolve(None)

    def write_layer(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
                    attention_mask: torch.Tensor | None) -> PagedLayerStep:
        """Write a layer's new K/V (planning the step at its first layer) and return what attention reads."""
        if self._pending is not None and self._pending.layer_idx == layer_idx and \
                self._pending.key_states is key_states:
            self._pending = None                           # being resolved now
        self.flush()
        batch_size, hkv, query_len, head_dim = key_states.shape
        step = self._step
        if step is None or layer_idx in step.layers_done:  # the first layer of a new forward step
            step = self._step = self._begin_step(batch_size, query_len, attention_mask, key_states.device)
        elif (batch_size, query_len) != (step.batch_size, step.query_len):
            raise ValueError(f"layer {layer_idx} got {batch_size} sequences x {query_len} tokens but this step was "
                             f"planned for {step.batch_size} x {step.query_len}")
        step.layers_done.add(layer_idx)
        layer = self._layer_with_pools(layer_idx, key_states, value_states)
        device_step = step.on(key_states.device)
        # [B, Hkv, S, D] -> [B*S, Hkv, D]: a view when S == 1 or the states are [B, S, Hkv, D] in memory (HF's usual
        # transpose of the projection), otherwise one copy.
        k = key_states.transpose(1, 2).reshape(batch_size * query_len, hkv, head_dim)
        v = value_states.transpose(1, 2).reshape(batch_size * query_len, hkv, head_dim)

        def write() -> None:
            if step.sparse is None or not self._sparse.append_decode(layer_idx, layer.k_pool, layer.v_pool, k, v,
                                                                     device_step.slot_mapping, step.sparse):
                append_kv(layer.k_pool, layer.v_pool, k, v, device_step.slot_mapping)

        held = None
        if step.sparse is not None and self._sparse.write_beside_selection(layer_idx, step.sparse):
            held = self._held_write = LayerWrite(write)    # runs beside the selection (LayerWrite)
        else:
            write()
        layer.seq_length = step.padded_len
        selector = None
        if step.sparse is not None:
            selector = self._sparse.layer_selector(layer_idx, layer.k_pool, step.sparse, device_step.layouts[FULL],
                                                   step.max_pages[FULL])
        return PagedLayerStep(layer.k_pool, layer.v_pool, step, device_step, selector, held)

    def _layer_with_pools(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> PagedKVLayer:
        """The layer, its pools made (sized like the other layers') from the first K/V it sees if it has none."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if layer.k_pool is None:
            reserve = layer.pools.reserve_pages(self._max_num_pages, len(self.layers)) if self._growable else 0
            layer.pools.allocate(self.allocator.num_pages, self._growable, reserve,
                                 functools.partial(self._new_pool_buffer, layer_idx))
        return layer

    # ---- prefix cache across generate() calls (prefix.py) ------------------------------------------------------

    def restore_prefix(self, prompts: list[list[int]], model_key: tuple) -> int:
        """Before a prefill into this empty cache: copy in the longest run of full pages every prompt starts with
        that the prefix cache holds (prompts [B][L]: token ids without padding; model_key: what identifies the model
        and its dtype/device) and return how many leading columns the rows now hold (0: nothing reused). At least
        one token of each prompt is left to prefill; rows with the same pages share them."""
        store = self.prefix_cache
        self.flush()
        if store is None or self._sparse is not None or self._padded_len != 0 or not prompts:
            return 0
        signature = (model_key, self.page_size, len(self.layers))
        hits = [store.lookup(signature, p, self.page_size, (len(p) - 1) // self.page_size) for p in prompts]
        n_pages = min(len(h) for h in hits)
        if n_pages == 0 or len(store.layer_shapes) != len(self.layers):
            return 0
        for seq_id in self._rows:
            self.allocator.free(seq_id)
        groups: dict[tuple[int, ...], int] = {}
        distinct = [tuple(h[:n_pages]) for h in hits]
        needed = len(set(distinct)) * n_pages
        if needed > self.allocator.num_free:
            self._grow_or_raise(needed)
        for layer_idx, (shape, dtype, device) in enumerate(store.layer_shapes):  # pools of the grown page count
            like = torch.empty((1, shape[1], 0, shape[2]), dtype=dtype, device=device)
            self._layer_with_pools(layer_idx, like, like)
        self._rows = []
        for slots in distinct:
            if slots in groups:
                self._rows.append(self.allocator.fork(groups[slots]))
                continue
            seq_id = groups[slots] = self.allocator.new_sequence()
            self.allocator.append([seq_id], [n_pages * self.page_size])
            store.read(list(slots), [(layer.k_pool, layer.v_pool) for layer in self.layers],
                       self.allocator.page_table(seq_id))
            self._rows.append(seq_id)
        self._pads = [[] for _ in prompts]
        self._padded_len = n_pages * self.page_size
        for layer in self.layers:
            layer.seq_length = self._padded_len
        self._step = None
        return self._padded_len

    def store_prefix(self, prompts: list[list[int]], model_key: tuple) -> None:
        """After a prefill of prompts without padding (prompts [B][L], row b of this cache): keep their full pages in
        the prefix cache for later calls."""
        store = self.prefix_cache
        self.flush()
        if store is None or self._sparse is not None or len(prompts) != len(self._rows):
            return
        if any(layer.k_pool is None for layer in self.layers):
            return
        signature = (model_key, self.page_size, len(self.layers))
        pools = [(layer.k_pool, layer.v_pool) for layer in self.layers]
        for row, tokens in enumerate(prompts):
            store.store(signature, tokens, self.page_size, self.allocator.page_table(self._rows[row]), pools)

    # ---- planning (once per forward step) ---------------------------------------------------------------------

    def _begin_step(self, batch_size: int, query_len: int, mask: torch.Tensor | None,
                    device: torch.device) -> StepPlan:
        """Allocate the step's slots and plan its layouts (host side; nothing is written to the device here)."""
        new_real = self._real_new_columns(batch_size, query_len, mask)
        past = self._padded_len
        if past == 0 and len(self._rows) != batch_size:
            for seq_id in self._rows:  # all empty: a new batch starts
                self.allocator.free(seq_id)
            self._rows = [self.allocator.new_sequence() for _ in range(batch_size)]
            self._pads = [[] for _ in range(batch_size)]
        elif len(self._rows) != batch_size:
            raise ValueError(f"the cache holds {len(self._rows)} sequences but got a batch of {batch_size}; "
                             "use reorder_cache / batch_select_indices / batch_repeat_interleave, or reset()")
        counts = [query_len] * batch_size if new_real is None else [sum(row) for row in new_real]
        lengths = [self.allocator.length(r) for r in self._rows]
        needed = self.allocator.pages_needed(self._rows, counts)
        if needed > self.allocator.num_free:
            self._grow_or_raise(needed)
        appended = self.allocator.append(self._rows, counts)
        if appended.copies:
            self._copy_pages(appended.copies)
        self._padded_len = past + query_len

        slot_mapping = [-1] * (batch_size * query_len)
        for b, slots in enumerate(appended.slots):
            columns = range(query_len) if new_real is None else [s for s in range(query_len) if new_real[b][s]]
            for s, slot in zip(columns, slots):
                slot_mapping[b * query_len + s] = slot
            if new_real is not None:
                self._pads[b].extend(_intervals(past, new_real[b]))
        runs = query_runs(lengths, new_real, query_len)
        page_tables = [self.allocator.page_table(r) for r in self._rows]
        layouts, largest = build_layouts(runs, page_tables, self.page_size, self.window)
        # The kernels size their grid (and the decode kernel its split-KV partition) from these bounds. Rounding them
        # up to powers of two makes eager steps and CUDA-graph replays (which need fixed bounds) run the very same
        # plans, so both give bit-identical results; the kernels skip the pages a row does not have.
        max_pages = {FULL: page_count_bucket(largest[FULL])}
        if self.window is not None:
            max_pages[WINDOW] = window_page_bound(self.window, self.page_size, query_len, max_pages[FULL])
        runs_are_rows = len(runs.rows) == batch_size
        cascade, max_group, groups, splits = None, 0, 0, 1
        if query_len == 1 and runs_are_rows and self._sparse is None and self.share_prefixes:
            shared = shared_prefixes(page_tables, runs.keys, self.page_size)
            if shared is not None:
                splits = prefix_splits(shared, self.page_size, self._num_q_heads, device_multiprocessors(device))
                extra, extra_largest, cascade = cascade_layouts(shared, runs, page_tables, self.page_size, splits)
                layouts.update(extra)
                max_pages.update({kind: page_count_bucket(n) for kind, n in extra_largest.items()})
                max_group = page_count_bucket(shared.largest_group)
                groups = len(shared.prefix_pages)
        shape = StepShape(batch_size, query_len, len(runs.rows),
                          tuple((kind, layout.cols.numel()) for kind, layout in layouts.items()), groups, splits)
        host_parts = (int32(runs.starts), int32(slot_mapping), layouts, cascade)
        sparse = None
        if self._sparse is not None:
            sparse = self._sparse.plan_step(lengths, [n + c for n, c in zip(lengths, counts)], page_tables,
                                            query_len, max_pages[FULL], pin=device.type == "cuda")
            sparse.select = sparse.select and runs_are_rows
        max_q_len = max(runs.starts[r + 1] - runs.starts[r] for r in range(len(runs.rows))) if runs.rows else 0
        return StepPlan(shape, self._padded_len, max_q_len, max_pages, runs_are_rows, host_parts, sparse=sparse,
                        window=self.window, max_group=max_group)

    def _real_new_columns(self, batch_size: int, query_len: int, mask: torch.Tensor | None
                          ) -> list[list[bool]] | None:
        """Which of each row's `query_len` new columns are real tokens (the last columns of a 2-D mask), or None when
        all are. Reading a CUDA mask is one small host copy per step (CUDA-graph decode steps pass no mask: their new
        tokens are real by construction of generate())."""
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != batch_size or mask.shape[1] < query_len:
            raise ValueError(f"attention_mask must be 2-D [batch={batch_size}, past + {query_len} new tokens], "
                             f"got {tuple(mask.shape)}")
        new = mask[:, mask.shape[1] - query_len:].to("cpu", torch.bool)
        return None if bool(new.all()) else new.tolist()

    def _grow_or_raise(self, needed: int) -> None:
        """Make `needed` pages free by growing every pool, or raise OutOfPagesError with nothing changed."""
        free, capacity = self.allocator.num_free, self.allocator.num_pages
        if not self._growable:
            raise OutOfPagesError(
                f"out of KV-cache pages: this step needs {needed} free page(s) of {self.page_size} tokens but only "
                f"{free} of the cache's {capacity} pages are free; free pages (crop, reset, fewer sequences) or "
                f"create PagedKVCache with a larger num_pages", needed=needed, available=free)
        shortfall = needed - free
        pooled = [layer.pools for layer in self.layers if layer.k_pool is not None]
        limits = [pools.reserve_pages(self._max_num_pages, len(self.layers)) for pools in pooled]
        if self._max_num_pages is not None:
            limits.append(self._max_num_pages)
        limit = min(limits, default=None)
        expected = None
        if self._expected_max_length is not None:
            # The pages in use (shared ones once) plus each row's own pages up to the expected length: rows that share
            # a prompt add only their new tokens' pages (and a copy of a shared, partly filled last page).
            remaining = max(0, self._expected_max_length - self._padded_len)
            page = self.page_size
            expected = self.allocator.num_used + sum(
                -(-(n + remaining) // page) - n // page for n in (self.allocator.length(r) for r in self._rows))
        target = growth_target(capacity, shortfall, prompt=self._padded_len == 0, expected_pages=expected,
                               page_size=self.page_size)
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
                        layer.pools.grow(attempt)
                        if self._sparse is not None:  # before any step (or graph replay) uses the new pages
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
            layer.pools.copy_pages(*on_device[dev])
            if self._sparse is not None:
                self._sparse.copy_page_summaries(layer_idx, layer.k_pool, *on_device[dev])

    # ---- batch-level operations (between steps) ---------------------------------------------------------------

    def _select_rows(self, indices: list[int]) -> None:
        """New rows = old rows at `indices` (repeats share pages by reference count); unreferenced pages are freed."""
        self.flush()
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
        self._pads = [list(self._pads[i]) for i in indices]

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
        on later versions, as with DynamicCache. crop(0) changes nothing, not even a decode step planned ahead
        (generate() calls it every step when it reads its stop flag a step late over a cache it returns).
        """
        tokens_to_remove = int(tokens_to_remove)
        if tokens_to_remove == 0:
            return
        self.flush()
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
        keep = max(0, self._padded_len + tokens_to_remove)
        self._step = None
        cut_pages: dict[int, int] = {}   # page -> valid tokens left, for pages a crop left partly filled
        for b, seq_id in enumerate(self._rows):  # the removed columns' real tokens: those not inside a padding run
            pads = self._pads[b]
            padding_removed = sum(max(0, end - max(start, keep)) for start, end in pads)
            real_removed = (self._padded_len - keep) - padding_removed
            length = self.allocator.length(seq_id) - real_removed
            self.allocator.truncate(seq_id, length)
            if real_removed and length % self.page_size:
                cut_pages[self.allocator.page_table(seq_id)[-1]] = length % self.page_size
            self._pads[b] = [(start, min(end, keep)) for start, end in pads if start < keep]
        remove = self._padded_len - keep
        self._padded_len = keep
        for layer in self.layers:
            layer.crop(remove)
        self._refresh_cut_summaries(cut_pages)

    def _refresh_cut_summaries(self, cut_pages: dict[int, int]) -> None:
        """Page key summaries of pages a crop cut (page -> valid tokens left) recomputed from the kept keys, so that a
        cropped cache selects as if the removed tokens had never been appended (generate() crops the step it runs
        past a stop). A page other rows still share keeps its wider summary: it covers their tokens too."""
        if self._sparse is None:
            return
        owned = [(page, count) for page, count in cut_pages.items() if self.allocator.refcount(page) == 1]
        if not owned:
            return
        pages, counts = (torch.tensor(values, dtype=torch.int64) for values in zip(*owned))
        on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer_idx, layer in enumerate(self.layers):
            if layer.k_pool is None:
                continue
            dev = layer.k_pool.device
            if dev not in on_device:
                on_device[dev] = refresh_slots(pages.to(dev), counts.to(dev), self.page_size)
            self._sparse.refresh_page_summaries(layer_idx, layer.k_pool, *on_device[dev])

    def reset(self) -> None:
        """Empty the cache: every page goes back to the free list; pools stay allocated for reuse."""
        self.flush()
        for seq_id in self._rows:
            self.allocator.free(seq_id)
        self._rows, self._pads = [], []
        self._padded_len = 0
        self._step = None
        for layer in self.layers:
            layer.reset()

    # ---- pool memory ----------------------------------------------------------------------------------------

    def _new_pool_buffer(self, layer_idx: int, role: str, device: torch.device, reserve_bytes: int) -> GrowableBuffer:
        """Backing memory of one growable pool: from the pool arena when this cache holds one, else fresh."""
        if self._arena is not None:
            return self._arena.buffer((layer_idx, role), device, reserve_bytes)
        return GrowableBuffer(device, reserve_bytes)

    def _new_summary_buffer(self, layer_idx: int, role: str, device: torch.device,
                            row_bytes: int) -> GrowableBuffer | None:
        """Backing memory of a sparse layer's page key summaries (flashcore_hf.sparse.PageKeySummaries; role
        "key_bounds" or "key_signs", one row of `row_bytes` per page + 1): growable at a fixed address like the
        pools (from the pool arena when this cache holds one); None with fixed-size pools (a plain tensor then)."""
        pools = self.layers[layer_idx].pools
        if not self._growable or pools is None or not pools.reserved_pages:
            return None
        return self._new_pool_buffer(layer_idx, role, device, (pools.reserved_pages + 1) * row_bytes)

    # ---- CUDA-graph decode (flashcore_hf/hf/decode_graphs.py) ---------------------------------------------------

    def fixed_decode_step_blocker(self, batch_size: int, device: torch.device) -> str | None:
        """Why a decode step of `batch_size` rows cannot run from fixed device buffers (a CUDA-graph replay), or None
        when it can: the rows all hold tokens and every layer has its pools on `device`. (Pools and page key summaries
        keep their addresses while they grow, or the step is re-keyed: device_buffers.)"""
        if len(self._rows) != batch_size:
            return f"the cache holds {len(self._rows)} rows for a batch of {batch_size}"
        if any(self.allocator.length(r) == 0 for r in self._rows):
            return "a row holds no token yet"
        if not all(layer.k_pool is not None and layer.k_pool.device == device for layer in self.layers):
            return f"not every layer's pools are on {device}"
        return None

    def device_buffers(self) -> tuple[tuple[int, int], ...]:
        """(address, bytes) of every device buffer a captured decode step reads or writes besides its own inputs:
        each layer's pools and, with sparse selection, its page key summaries. A replay is valid only for these."""
        tensors = [t for layer in self.layers for t in (layer.k_pool, layer.v_pool) if t is not None]
        if self._sparse is not None:
            tensors += self._sparse.device_buffers()
        return tuple((t.data_ptr(), t.numel() * t.element_size()) for t in tensors)

    def plan_decode_step(self, device: torch.device) -> StepPlan:
        """Host half of a decode step (one new, real token per row): page allocation and the step's layouts, with no
        device work (copy-on-write page copies aside). A CUDA-graph replay loads it into its fixed buffers
        (`fixed_decode_shape`). The plan `prepare_next_decode_step` made, when nothing changed the cache since.
        Raises OutOfPagesError like a forward step."""
        ahead = self._next_decode
        if ahead is not None and ahead[1] == device and self._pending is None:
            self._next_decode = None
            return ahead[0]
        self.flush()
        return self._begin_step(len(self._rows), 1, None, device)

    def prepare_next_decode_step(self, device: torch.device) -> None:
        """Plan the next decode step now: a CUDA-graph runner calls this right after launching a replay, so the
        host work of the next step (page allocation, layouts) overlaps the GPU's work on this one instead of
        preceding the next launch. `plan_decode_step` returns that plan; any other operation first undoes it
        (`flush`), except get_seq_length / get_mask_sizes, which read lengths the plan does not change. Never
        raises: when the next step cannot be planned now (out of pages), it is planned, and raises, when it
        comes."""
        if self._next_decode is not None or self._pending is not None or not self._rows:
            return
        try:
            plan = self._begin_step(len(self._rows), 1, None, device)
        except OutOfPagesError:
            return
        self._next_decode = (plan, device)

    def _cancel_next_decode(self) -> None:
        """Undo a decode step planned ahead that did not come: one token off every row (pages it took return to the
        free list; a page it copied on write stays the row's own copy, holding the same tokens) and the padded
        length."""
        ahead, self._next_decode = self._next_decode, None
        if ahead is None:
            return
        for seq_id in self._rows:
            self.allocator.truncate(seq_id, self.allocator.length(seq_id) - 1)
        self._padded_len -= 1

    def fixed_decode_shape(self, plan: StepPlan) -> StepShape:
        """The packed metadata of a decode step like `plan` (its batch, page-count buckets and cascade groups) at the
        buckets' capacities: the fixed buffers a CUDA graph is captured with."""
        batch_size, bounds = plan.batch_size, plan.max_pages
        capacities = [(FULL, batch_size * bounds[FULL])]
        if self.window is not None:
            capacities.append((WINDOW, batch_size * bounds[WINDOW]))
        if plan.shape.groups:
            capacities += [(PREFIX, plan.shape.rows(PREFIX) * bounds[PREFIX]), (SUFFIX, batch_size * bounds[SUFFIX])]
        return StepShape(batch_size, 1, batch_size, tuple(capacities), plan.shape.groups, plan.shape.prefix_splits)

    def begin_fixed_step(self, device_step: DeviceStep, shape: StepShape, plan: StepPlan) -> None:
        """Make the next forward's layers take `device_step` (fixed device buffers of a CUDA graph, made by
        `fixed_decode_shape(plan)`) as the step's metadata instead of planning one, with `plan`'s bounds; what the
        buffers hold when the graph replays is what counts."""
        bounds = dict(plan.max_pages)
        sparse = None if self._sparse is None else self._sparse.fixed_decode_plan(bounds[FULL])
        self._step = StepPlan(shape, plan.padded_len, 1, bounds, True, None,
                              per_device={device_step.q_indptr.device: device_step}, sparse=sparse,
                              window=self.window, max_group=plan.max_group)

    def finish_replayed_step(self, plan: StepPlan) -> None:
        """Host bookkeeping of a step whose layers ran inside a graph replay (their Python code did not run)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.seq_length = plan.padded_len
        self._step = None

    # ---- reporting --------------------------------------------------------------------------------------------

    # generate() asks these every step: they read the layers' lengths, which a step planned ahead does not change,
    # so they keep that plan.
    def get_seq_length(self, *args, **kwargs) -> int:
        self._write_pending()
        return super().get_seq_length(*args, **kwargs)

    def get_mask_sizes(self, *args, **kwargs):
        self._write_pending()
        return super().get_mask_sizes(*args, **kwargs)

    def sequence_lengths(self) -> list[int]:
        """Real (unpadded) tokens stored for each row."""
        self.flush()
        return [self.allocator.length(r) for r in self._rows]

    def page_table(self, row: int) -> list[int]:
        """Pages of row `row` in token order (a copy)."""
        self.flush()
        return list(self.allocator.page_table(self._rows[row]))

    def stats(self) -> CacheStats:
        """Pages total/used/shared/free, bytes total/used (K and V of every layer with pools)."""
        self.flush()
        alloc = self.allocator
        page_bytes = sum(2 * layer.pools.page_bytes for layer in self.layers if layer.k_pool is not None)
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


def _intervals(start: int, real: list[bool]) -> list[tuple[int, int]]:
    """[start', end') column intervals of the padding (False) entries of `real`, whose first column is `start`."""
    out, open_at = [], None
    for s, is_real in enumerate(real):
        if not is_real and open_at is None:
            open_at = start + s
        elif is_real and open_at is not None:
            out.append((open_at, start + s))
            open_at = None
    if open_at is not None:
        out.append((open_at, start + len(real)))
    return out
