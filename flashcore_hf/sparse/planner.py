"""`SparseCachePlanner`: what `PagedKVCache` runs for sparse page selection.

- At construction: which layers select pages, and a `PageKeySummaries` per such layer under "topk".
- Once per step (`plan_step` on the host; `fixed_decode_plan` for CUDA-graph decode steps): whether this step
  selects pages, and which pages' summaries to refresh. A step of one new token per sequence needs no host data:
  each layer appends its new K/V and folds the new keys into their pages' bounds in one kernel (`append_decode`:
  `PageKeySummaries.append_decode`), so eager decode steps and CUDA-graph replays run the very same ops. Longer
  steps (prefill) list their written pages on the host and recompute those pages' bounds after the append.
- Per layer (`layer_selector`, after the layer's K/V were appended, or with them held back to run beside the
  selection on "topk" decode steps: `write_beside_selection`): bring the layer's summaries of the pages a
  longer step wrote up to date (so decode always scores fresh bounds), then give attention a `LayerSelector` (the
  pages this layer reads) on sparse steps of sparse layers, None otherwise.
- Copy-on-write page copies (`copy_page_summaries`) carry the copied pages' summaries along; pages a crop cut get
  theirs recomputed from the kept keys (`refresh_page_summaries`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..layout import PageLayout
from .config import SparseConfig
from .selection import LayerSelector, StepSelection, step_is_sparse
from .summaries import PageKeySummaries, refresh_slots


@dataclass
class SparseStepPlan:
    """One step's sparse state.

    query_len: new tokens per sequence. select: whether sparse layers select pages this step (a function of the
    step's page-count bucket, so a CUDA graph captured for a bucket stays right for every step it replays).
    written: None for steps of one token per sequence (their keys update the bounds on the device), else [2, n]
    int32 on the host (pinned when CUDA is used): the distinct pages written (row 0) and their valid tokens
    afterwards (row 1). The per-device parts (refresh slots, StepSelection) are made on first use.
    """

    query_len: int
    select: bool
    written: torch.Tensor | None = None
    _refresh: dict = field(default_factory=dict)
    _selections: dict = field(default_factory=dict)

    def update_summaries(self, summaries: PageKeySummaries, k_pool: torch.Tensor, page_size: int) -> None:
        """After a step of several tokens per sequence appended one layer's K/V into k_pool: recompute that layer's
        bounds of the pages the step wrote. (A decode step's keys went into the bounds with the append:
        SparseCachePlanner.append_decode.)"""
        if self.written is None:
            return
        device = k_pool.device
        found = self._refresh.get(device)
        if found is None:
            written = self.written if device.type == "cpu" else self.written.to(device, non_blocking=True)
            found = self._refresh[device] = refresh_slots(written[0], written[1], page_size)
        if found[0].shape[0]:
            summaries.refresh(k_pool, *found)

    def selection_on(self, layout: PageLayout, max_pages: int, config: SparseConfig,
                     page_size: int) -> StepSelection:
        """The StepSelection of the device of `layout` (the step's dense per-sequence layout there; max_pages: the
        step's bound on its rows)."""
        device = layout.cols.device
        selection = self._selections.get(device)
        if selection is None:
            selection = self._selections[device] = StepSelection(config, layout, max_pages, self.query_len,
                                                                 page_size)
        return selection


class SparseCachePlanner:
    """Sparse selection state of one PagedKVCache.

    config: the SparseConfig. layer_types: HF layer type of every layer ("full_attention", "sliding_attention").
    page_size: the cache's tokens per page. sliding_everywhere: the model applies a sliding window on every layer
    although it declares no layer types (e.g. Mistral with config.sliding_window set): then no layer selects.
    new_summary_buffer: optional (layer_idx, role, device, row_bytes) -> GrowableBuffer | None, where each layer's
    page key summaries live (see PageKeySummaries: role "key_bounds" or "key_signs").
    """

    def __init__(self, config: SparseConfig, layer_types: list[str], page_size: int,
                 sliding_everywhere: bool = False, new_summary_buffer: Callable | None = None):
        config.page_counts(page_size)  # validates the budget against the page size now, not at the first decode
        self.config = config
        self.page_size = page_size
        self.sparse_layers = frozenset(
            i for i, kind in enumerate(layer_types)
            if not sliding_everywhere and config.is_sparse_layer(i, kind))
        self.summaries = {}
        if config.policy == "topk":
            self.summaries = {i: PageKeySummaries(None if new_summary_buffer is None else
                                                  functools.partial(new_summary_buffer, i),
                                                  keep_signs=config.scoring == "signs")
                              for i in self.sparse_layers}

    @property
    def active(self) -> bool:
        return bool(self.sparse_layers)

    def plan_step(self, lengths_before: list[int], lengths_after: list[int], page_tables: list[list[int]],
                  query_len: int, max_pages_per_seq: int, pin: bool) -> SparseStepPlan:
        """The step's plan. lengths_* [B]: real tokens per sequence before/after this step's append;
        page_tables: each sequence's pages after it; max_pages_per_seq: the step's page-count bucket."""
        select = step_is_sparse(self.config, query_len, max_pages_per_seq, self.page_size)
        if query_len == 1 or not self.summaries:
            return SparseStepPlan(query_len, select)
        page_size = self.page_size
        pages, counts = [], []
        for before, after, table in zip(lengths_before, lengths_after, page_tables):
            for j in range(before // page_size, -(-after // page_size)):
                pages.append(table[j])
                counts.append(min(page_size, after - j * page_size))
        written = torch.tensor([pages, counts], dtype=torch.int32).view(2, len(pages))
        return SparseStepPlan(query_len, select, written.pin_memory() if pin else written)

    def fixed_decode_plan(self, max_pages_per_seq: int) -> SparseStepPlan:
        """The plan of a decode step (one token per sequence) whose metadata sits in fixed device buffers."""
        return SparseStepPlan(1, step_is_sparse(self.config, 1, max_pages_per_seq, self.page_size))

    def append_decode(self, layer_idx: int, k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, slot_mapping: torch.Tensor, plan: SparseStepPlan) -> bool:
        """On a decode step (one new token per sequence) of a layer with page summaries: append its new K/V (k, v
        [B, Hkv, D]; slot_mapping [B]) and fold the keys into the summaries, in one kernel; True when done, False
        when the caller appends (other layers and steps)."""
        summaries = self.summaries.get(layer_idx)
        if summaries is None or plan.written is not None:
            return False
        summaries.append_decode(k_pool, v_pool, k, v, slot_mapping)
        return True

    def write_beside_selection(self, layer_idx: int, plan: SparseStepPlan) -> bool:
        """Whether layer `layer_idx`'s K/V write on this step may run beside its page selection (the cache's
        LayerWrite): a "topk" layer selecting on a step of one token per sequence, whose write (`append_decode`)
        changes only the summaries and K/V of each sequence's newest page. Every selection keeps that page whatever
        its score (StepSelection forces the pages of the step's new tokens in), and the kernels ignore the score of
        a forced page (even one computed from summaries half updated), so the pages selected and the K/V attention
        reads after the join do not depend on which runs first."""
        return (plan.select and plan.written is None and layer_idx in self.sparse_layers
                and layer_idx in self.summaries)

    def layer_selector(self, layer_idx: int, k_pool: torch.Tensor, plan: SparseStepPlan, layout: PageLayout,
                       max_pages: int) -> LayerSelector | None:
        """After layer `layer_idx` appended its K/V: refresh its summaries of the pages a longer step wrote; on
        sparse steps of sparse layers, the selector of the pages it reads (None: it reads every page of `layout`).
        layout / max_pages: the step's dense per-sequence layout on the layer's device and its bound."""
        if layer_idx not in self.sparse_layers:
            return None
        summaries = self.summaries.get(layer_idx)
        if summaries is not None:
            plan.update_summaries(summaries, k_pool, self.page_size)
        if not plan.select:
            return None
        return LayerSelector(plan.selection_on(layout, max_pages, self.config, self.page_size), summaries, k_pool)

    def fit_summaries(self, layer_idx: int, k_pool: torch.Tensor) -> None:
        """The layer's pool now has k_pool.shape[0] pages: its page key bounds must cover them all."""
        summaries = self.summaries.get(layer_idx)
        if summaries is not None:
            summaries.fit(k_pool)

    def device_buffers(self) -> list[torch.Tensor]:
        """The page key summaries of every layer (what a captured step reads and writes besides the pools)."""
        return [t for s in self.summaries.values() for t in (s.bounds, s.signs) if t is not None]

    def refresh_page_summaries(self, layer_idx: int, k_pool: torch.Tensor, pages: torch.Tensor,
                               page_slots: torch.Tensor) -> None:
        """Recompute the layer's summaries of `pages` [n] from the keys at page_slots [n, P] of k_pool (after a crop
        cut them; summaries.refresh_slots makes both)."""
        summaries = self.summaries.get(layer_idx)
        if summaries is not None:
            summaries.refresh(k_pool, pages, page_slots)

    def copy_page_summaries(self, layer_idx: int, k_pool: torch.Tensor, src: torch.Tensor,
                            dst: torch.Tensor) -> None:
        """Copy-on-write of pages src -> dst (int64, on the device of the layer's key pool k_pool): their summary
        rows too."""
        summaries = self.summaries.get(layer_idx)
        if summaries is not None:
            summaries.copy_pages(k_pool, src, dst)
