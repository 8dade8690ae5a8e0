"""`SparseConfig`: which pages each decode step reads (the typed, validated policy configuration).

Policies (page granularity; a page is `page_size` consecutive tokens of one sequence):
- "dense" (default): every page; nothing else in this package runs.
- "streaming": StreamingLLM at page granularity: the first pages (attention sinks) and as many of the most recent
  pages as the token budget allows. The same pages for every layer and kv head, whatever the query.
- "topk": query-aware: each sparse layer keeps element-wise min/max summaries of every page's keys; every decode
  step scores each page of each (sequence, kv head) and keeps the best pages within the budget, plus the sink and
  recent pages. Scores (`scoring`): "bounds" (Quest), an upper bound of q.k over the page from its min/max; or
  "signs", which also keeps one bit per key channel (its sign) and estimates each key from the bound on its sign's
  side, the page scoring its best key's estimate: far closer to the exact page score when a page holds many
  unrelated keys (benchmarks/notes/sparse.md).

What stays dense whatever the policy: prefill and any step with more than `max_query_len` new tokens per
sequence, the first `dense_layers` layers, sliding-window layers (their window is counted in positions, which a
selected subset of pages would change), and any step whose longest sequence already fits in the budget (reading
all pages is then both exact and no more work).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

POLICIES = ("dense", "streaming", "topk")
SCORINGS = ("bounds", "signs")
MAX_SPARSE_QUERY_LEN = 16  # csrc/kernels/cuda/launchers.h kDecodeMaxQueriesPerSeq
HEAD_REDUCTIONS = ("max", "sum")


@dataclass(frozen=True)
class SparseConfig:
    """Sparse page selection for long-context decode. Immutable; validated on construction.

    policy: "dense" | "streaming" | "topk" (see the module docstring).
    token_budget: most key tokens a sparse layer reads per (sequence, kv head) and decode step; rounded down to
        whole pages (budget_pages = token_budget // page_size), and must cover the sink and recent pages.
    sink_tokens: the first tokens of every sequence that are always read (attention sinks), rounded up to pages.
        0 disables sinks.
    recent_tokens: the last tokens that "topk" always reads, rounded up to pages; the page holding the newest token
        (and every page holding one of the step's new tokens) is always read whatever this says. "streaming" reads
        every page of the budget left after the sinks from the most recent end, so this only sets its minimum.
    dense_layers: the first `dense_layers` layers of the model always read every page (Quest keeps the first two
        dense: their attention is broad and cheap selection would hurt most there).
    head_reduction: "max" | "sum": how "topk" combines the page scores of the query heads that share a kv head
        (and, for steps of several queries, of the queries) into the one page list of that kv head.
    rerank: "topk" in two stages when >= 2: the page scores (`scoring`) pick rerank x budget candidate pages,
        then the exact scores of their keys (the largest q.k over a page's keys and the kv head's query heads) pick
        the budget. A page holding many unrelated keys has a loose bound but an exact score, so this ranks pages of
        16 or more tokens much better; it costs reading the candidates' keys (two kernels on CUDA, the exact scores
        and the pick: H200, 128K context, budget 4096, 64-token pages, rerank=4: 59 us per layer with the append
        and the attention, 2.4x faster than dense decode, against 32 us without rerank; 2026-12-03). 0 (default)
        or 1: the scores alone.
    scoring: "bounds" | "signs": how "topk" scores a page (the first stage when rerank is on). "bounds": Quest's
        upper bound sum_d max(q_d max_d, q_d min_d) from the page's element-wise key max / min. "signs": the largest
        over the page's valid keys of sum_d q_d (max_d if k_d > 0 else min_d), each key reduced to its sign bits
        (head_dim bits per key and kv head, 1/16 of a 16-bit key cache more memory), scored by the select_pages
        kernels (a warp per page tabulates the page's sums per group of 3 channels once, then one lookup per group
        a key).
    max_query_len: steps with at most this many new tokens per sequence use the policy (decode; small n_q such as
        speculative verification); longer steps (prefill) are dense. At most MAX_SPARSE_QUERY_LEN (16), the most
        queries per sequence the CUDA decode kernel, which reads per-kv-head page lists, takes.
    """

    policy: Literal["dense", "streaming", "topk"] = "dense"
    token_budget: int = 4096
    sink_tokens: int = 4
    recent_tokens: int = 64
    dense_layers: int = 2
    head_reduction: Literal["max", "sum"] = "max"
    rerank: int = 0
    scoring: Literal["bounds", "signs"] = "bounds"
    max_query_len: int = 16

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"SparseConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.head_reduction not in HEAD_REDUCTIONS:
            raise ValueError(f"SparseConfig.head_reduction must be one of {HEAD_REDUCTIONS}, "
                             f"got {self.head_reduction!r}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"SparseConfig.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        for name, minimum in (("token_budget", 1), ("sink_tokens", 0), ("recent_tokens", 0), ("dense_layers", 0),
                              ("rerank", 0), ("max_query_len", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"SparseConfig.{name} must be an int >= {minimum}, got {value!r}")
        if self.max_query_len > MAX_SPARSE_QUERY_LEN:
            raise ValueError(f"SparseConfig.max_query_len must be <= {MAX_SPARSE_QUERY_LEN} (the most queries per "
                             f"sequence the decode kernel takes with per-kv-head page lists), got {self.max_query_len}")

    @property
    def enabled(self) -> bool:
        """Whether any layer may read fewer than all of its pages."""
        return self.policy != "dense"

    def page_counts(self, page_size: int) -> tuple[int, int, int]:
        """(budget_pages, sink_pages, recent_pages) for pages of `page_size` tokens.

        Raises ValueError when the budget cannot hold the sink pages plus at least one recent page.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        budget = self.token_budget // page_size
        sinks = -(-self.sink_tokens // page_size)
        recent = max(1, -(-self.recent_tokens // page_size))
        if self.enabled and budget < sinks + recent:
            raise ValueError(
                f"SparseConfig: token_budget={self.token_budget} is {budget} page(s) of {page_size} tokens, fewer "
                f"than the {sinks} sink page(s) (sink_tokens={self.sink_tokens}) plus {recent} recent page(s) "
                f"(recent_tokens={self.recent_tokens}) it must always hold; raise token_budget")
        return budget, sinks, recent

    def is_sparse_layer(self, layer_idx: int, layer_type: str = "full_attention") -> bool:
        """Whether layer `layer_idx` (of HF `layer_type`) selects pages under this config."""
        return self.enabled and layer_idx >= self.dense_layers and layer_type == "full_attention"
