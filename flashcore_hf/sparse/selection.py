"""Page selection on the device: from a step's dense page lists to the sparse PageLayout each policy reads.

Everything here runs on fixed shapes (sizes known on the host: batch, pages of the longest sequence, budget)
without a host sync, so it can run inside a captured CUDA graph or torch.compile(fullgraph=True):

- `padded_page_table`: the dense CSR layout as a [B, max_pages] table (once per step and device), with a bias that
  forces the sink and recent pages in (+inf) and the padding entries of shorter sequences out (-inf).
- `streaming_layout`: sinks + the most recent pages, one row per sequence (every head and layer reads the same).
- `topk_layout` / `StepSelection.layout_for` under "topk": the `select_pages` op (two compiled kernels per layer:
  page scores per (sequence, kv head), from the page bounds or, with scoring "signs", from the keys' sign bits and
  the bounds; then a radix top-k that writes the picks in key order) gives one row per (sequence, kv head) (row
  b * Hkv + h, the per-head layout paged_attention accepts). With `rerank`, select_pages picks rerank x budget
  candidates and `rerank_layout` keeps the budget by the exact scores of their keys.
- `StepSelection`: the per-step, per-device object the sparse layers of a decode step share.

When a sequence has fewer pages than the budget, the surplus picks are padding entries that get token count 0: empty
pages the kernels skip, so rows keep a fixed length. Picks come in key order (causal masking of steps with several
queries per sequence reads key positions from the order).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layout import PageLayout
from ..ops import candidate_page_scores, select_candidate_pages, select_pages
from .config import SparseConfig
from .summaries import PageKeySummaries


@dataclass(frozen=True)
class PaddedPageTable:
    """A step's dense page lists as fixed-shape tensors (on one device).

    pages [B, M] int32: physical page of the j-th page of sequence b (entries past the sequence's end repeat one of
        the batch's valid page ids, so any gather stays in bounds).
    counts [B, M] int32: valid tokens on that page (0 for the entries past the end).
    bias [B, M] float32: +inf for pages every policy keeps (sinks, recent), -inf for entries past the end, else 0.
    """

    pages: torch.Tensor
    counts: torch.Tensor
    bias: torch.Tensor

    @property
    def max_pages(self) -> int:
        return self.pages.shape[1]


def padded_page_table(layout: PageLayout, max_pages: int, sink_pages: int, recent_pages: int) -> PaddedPageTable:
    """[B, max_pages] tables from a per-sequence CSR layout (row_offsets [B + 1], cols/token_counts [nnz], nnz >= 1).

    max_pages: host-known upper bound on any row's page count (PagedKVCache's max_pages_per_seq).
    sink_pages / recent_pages: how many of the first / last pages of each sequence get bias +inf.
    """
    row_offsets = layout.row_offsets.long()
    nnz = layout.cols.numel()
    j = torch.arange(max_pages, device=row_offsets.device)
    num_pages = (row_offsets[1:] - row_offsets[:-1])[:, None]                      # [B, 1]
    valid = j < num_pages
    entry = (row_offsets[:-1, None] + j).clamp_(max=nnz - 1)
    pages = layout.cols[entry]
    counts = torch.where(valid, layout.token_counts[entry], 0)
    forced = (j < sink_pages) | (j >= num_pages - recent_pages)
    bias = torch.where(valid, torch.where(forced, math.inf, 0.0), -math.inf).float()
    return PaddedPageTable(pages, counts, bias)


def streaming_layout(table: PaddedPageTable, budget_pages: int) -> PageLayout:
    """Sinks + most recent pages of each sequence, budget_pages per row (one row per sequence).

    The sink pages carry bias +inf; the rest is filled from the newest page backwards. Rows: [B * budget_pages].
    """
    # Page index as the score: later pages win; the bias puts sinks first and padding last.
    recency = torch.arange(table.max_pages, device=table.bias.device, dtype=torch.float32)
    cols, counts = pick_pages(recency.expand(table.pages.shape[0], 1, -1), table, budget_pages)
    return rows_layout(cols, counts)


def topk_layout(q: torch.Tensor, bounds: torch.Tensor, table: PaddedPageTable, budget_pages: int,
                query_len: int = 1, head_reduction: str = "max",
                fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> PageLayout:
    """Quest "topk" selection (flashcore_hf.ops.select_pages: scores, top-k and the picks in key order, in compiled
    kernels) as a PageLayout with B * Hkv rows of k = min(budget_pages, M) pages (row b * Hkv + h: kv head h of
    sequence b). q [B * query_len, Hq, D]; bounds: PageKeySummaries.bounds. fixed: the layout's data-independent
    parts (row offsets, staging ids; `fixed_layout_parts`) when the caller keeps them across layers."""
    k = min(budget_pages, table.max_pages)
    cols, counts = select_pages(q, bounds, table.pages, table.counts, table.bias, k, query_len, head_reduction)
    return rows_layout(cols, counts, fixed)


def pick_pages(scores: torch.Tensor, table: PaddedPageTable, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, M) best page entries per (sequence, row) by scores [B, R, M] (R: kv heads, or 1), table.bias
    applied (sinks and recent pages first, padding last), in key order: (cols, counts) [B, R, min(k, M)] int32
    (padding entries count 0)."""
    hkv, k = scores.shape[1], min(k, table.max_pages)
    bias = table.bias[:, None, :]
    ranked = torch.where(bias == 0, scores, bias)                  # +-inf bias wins whatever the score
    picked = torch.topk(ranked, k, dim=-1, sorted=False).indices.sort(dim=-1).values
    cols = table.pages[:, None, :].expand(-1, hkv, -1).gather(-1, picked)
    counts = table.counts[:, None, :].expand(-1, hkv, -1).gather(-1, picked)
    return cols, counts


def rerank_layout(q: torch.Tensor, k_pool: torch.Tensor, forced_pages: torch.Tensor,
                  cols: torch.Tensor, counts: torch.Tensor, budget_pages: int,
                  fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> PageLayout:
    """The second stage of "topk" with rerank: of candidate pages cols / counts [B, Hkv, C] (key order, from the
    first stage), keep the budget_pages with the largest exact score, max over the page's keys and the kv head's
    queries of q.k (the `candidate_page_scores` op; forced_pages [B, F]: sink and recent page ids, always kept;
    padding entries never), picked in key order by `select_candidate_pages`: two kernels on CUDA. q [B * S, Hq, D];
    k_pool [num_pages, P, Hkv, D]. Fixed shapes, no host sync. Rows: B * Hkv of min(budget_pages, C) pages."""
    k = min(budget_pages, cols.shape[-1])
    scores = candidate_page_scores(q, k_pool, cols, counts, forced_pages, q.shape[0] // cols.shape[0])
    picked_cols, picked_counts = select_candidate_pages(scores, cols, counts, k)
    return rows_layout(picked_cols, picked_counts, fixed)


def forced_page_ids(layout: PageLayout, table: PaddedPageTable, sink_pages: int, recent_pages: int) -> torch.Tensor:
    """[B, sink_pages + recent_pages] ids of each sequence's first and last pages (the ones table.bias forces in),
    -1 where a sequence has fewer pages."""
    num_pages = (layout.row_offsets[1:] - layout.row_offsets[:-1]).long()[:, None]             # [B, 1]
    device = num_pages.device
    sinks = torch.arange(sink_pages, device=device)[None, :].expand(num_pages.shape[0], -1)
    recent = num_pages - torch.arange(1, recent_pages + 1, device=device)[None, :]
    j = torch.cat([sinks, recent], dim=1)
    valid = (j >= 0) & (j < num_pages)
    ids = table.pages.gather(1, j.clamp(0, table.max_pages - 1))
    return torch.where(valid, ids, -1)


def rows_layout(cols: torch.Tensor, counts: torch.Tensor,
                fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> PageLayout:
    """The PageLayout whose row i lists cols / counts [..., k] flattened to [rows, k] (row b * Hkv + h for per-head
    picks [B, Hkv, k]). fixed: its data-independent parts (`fixed_layout_parts`) when the caller keeps them."""
    k = cols.shape[-1]
    row_offsets, staging_ids = fixed if fixed is not None else fixed_layout_parts(cols.numel() // k, k, cols.device)
    return PageLayout(row_offsets, cols.reshape(-1), counts.reshape(-1), staging_ids)


def fixed_layout_parts(rows: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_offsets [rows + 1], staging_ids [rows * k] all -1) of a layout of `rows` rows of k resident pages."""
    return (torch.arange(rows + 1, dtype=torch.int32, device=device) * k,
            torch.full((rows * k,), -1, dtype=torch.int32, device=device))


class StepSelection:
    """What the sparse layers of one decode step share on one device: the padded page table, the fixed parts of the
    per-head layouts (row offsets, staging ids) and, for "streaming", the one layout all of them read.

    config: the SparseConfig (policy "streaming" or "topk"). layout: the step's dense per-sequence layout on this
    device; max_pages: host-known bound on its rows; query_len: new tokens per sequence this step;
    page_size: tokens per page.
    """

    def __init__(self, config: SparseConfig, layout: PageLayout, max_pages: int, query_len: int, page_size: int):
        budget, sinks, recent = config.page_counts(page_size)
        recent = max(recent, step_recent_pages(query_len, page_size))
        self.config = config
        self.budget_pages = budget
        self.query_len = query_len
        self.table = padded_page_table(layout, max_pages, sinks, recent)
        self._forced_counts = (sinks, recent)
        self._layout = layout
        self._forced: torch.Tensor | None = None
        self._streaming: PageLayout | None = None
        self._per_head_fixed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def max_pages_per_row(self) -> int:
        return min(self.budget_pages, self.table.max_pages)

    def layout_for(self, q: torch.Tensor, summaries: PageKeySummaries | None,
                   k_pool: torch.Tensor | None = None) -> PageLayout:
        """The layout a sparse layer reads. q [B * query_len, Hq, D] (packed decode queries); k_pool: the layer's
        key pool (read by "topk" with rerank)."""
        if self.config.policy == "streaming":
            if self._streaming is None:
                self._streaming = streaming_layout(self.table, self.budget_pages)
            return self._streaming
        hkv = summaries.bounds.shape[1]
        fixed = self._per_head_fixed.get(hkv)
        if fixed is None:  # the same for every layer of the step: made once
            fixed = self._per_head_fixed[hkv] = fixed_layout_parts(
                self.table.pages.shape[0] * hkv, self.max_pages_per_row, self.table.pages.device)
        rerank = self.config.rerank >= 2
        k = min((self.config.rerank if rerank else 1) * self.budget_pages, self.table.max_pages)
        signs = summaries.signs if self.config.scoring == "signs" else None
        cols, counts = select_pages(q, summaries.bounds, self.table.pages, self.table.counts, self.table.bias, k,
                                    self.query_len, self.config.head_reduction, signs)
        if not rerank:
            return rows_layout(cols, counts, fixed)
        if self._forced is None:
            self._forced = forced_page_ids(self._layout, self.table, *self._forced_counts)
        return rerank_layout(q, k_pool, self._forced, cols, counts, self.budget_pages, fixed)


def step_recent_pages(query_len: int, page_size: int) -> int:
    """Pages the step's query_len newest tokens can span (they must all be read: each query sees itself)."""
    return (query_len + page_size - 2) // page_size + 1


def step_is_sparse(config: SparseConfig, query_len: int, max_pages: int, page_size: int) -> bool:
    """Host-side decision for a whole step: whether sparse layers select pages at all.

    max_pages: the step's host bound on pages per sequence (PagedKVCache's power-of-two bucket, so the decision is
    the same for every step a captured CUDA graph replays). Dense when the policy is dense, the step is long
    (prefill), that bound fits in the budget (all pages are read anyway: exact and no more work), or the sinks plus
    the pages of the step's new tokens would not fit in the budget.
    """
    if not config.enabled or query_len > config.max_query_len:
        return False
    budget, sinks, recent = config.page_counts(page_size)
    return max_pages > budget and sinks + max(recent, step_recent_pages(query_len, page_size)) <= budget


@dataclass(frozen=True)
class LayerSelector:
    """The pages one sparse layer reads on this decode step: `select(q)` (q [B * S_q, Hq, D] packed queries) gives
    the layout (rows per sequence for "streaming", per (sequence, kv head) for "topk") of `max_pages_per_row` pages
    each. selection: the step's shared StepSelection; summaries: this layer's page key bounds ("topk"), else None;
    k_pool: this layer's key pool (the exact scores of "topk" with rerank)."""

    selection: StepSelection
    summaries: PageKeySummaries | None
    k_pool: torch.Tensor | None = None

    @property
    def max_pages_per_row(self) -> int:
        return self.selection.max_pages_per_row

    def rows(self, num_kv_heads: int) -> int:
        """Layout rows of the selected layout."""
        batch = self.selection.table.pages.shape[0]
        return batch if self.selection.config.policy == "streaming" else batch * num_kv_heads

    def select(self, q: torch.Tensor) -> PageLayout:
        return self.selection.layout_for(q, self.summaries, self.k_pool)
