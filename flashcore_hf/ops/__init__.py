"""The op layer: the `flashcore` op library's wrappers (library.py: cache writes, page selection, the decode step's
grouped linear layers), paged attention planned once and run many times (plan.py), the same contract computed with
torch SDPA where no compiled kernel applies (fallback.py), and the merge of attention over disjoint key sets,
cascade decode's (merge.py)."""
from .fallback import sdpa_from_pages
from .library import (append_kv, build_layout, candidate_page_scores, grouped_linear, kernel_supports,
                      select_candidate_pages, select_pages)
from .merge import cascade_attention, merge_attention_states
from .plan import DECODE_QUERIES_PER_SEQUENCE, AttentionPlan, paged_attention, plan_attention

__all__ = ["DECODE_QUERIES_PER_SEQUENCE", "AttentionPlan", "append_kv", "build_layout", "candidate_page_scores",
           "cascade_attention", "grouped_linear", "kernel_supports", "merge_attention_states", "paged_attention",
           "plan_attention", "sdpa_from_pages", "select_candidate_pages", "select_pages"]
