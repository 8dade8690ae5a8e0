"""Attention over the union of disjoint key sets from the attention over each (what cascade decode needs: a shared
prompt's pages read once for a group of sequences, in a few key ranges, and each sequence's own pages separately)."""
from __future__ import annotations

import torch

from .library import _ops


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                           sinks: torch.Tensor | None = None, a_rows: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, H, D] (out_b's dtype) of softmax attention over keys A and B together, in one kernel.

    out_b [T, H, D], lse_b [T, H]: attention over B alone (normalised over its own keys) and its natural-log
    sum-exp of the scaled scores (float32; -inf: no key, its out rows are zeros). out_a [T_a, H, D], lse_a [T_a, H]:
    the same over A, row a_rows[t] for output row t (a_rows [T] int32; None: row t, T_a = T); or out_a
    [S, T_a, H, D], lse_a [S, T_a, H]: A in S disjoint parts (key splits), each attended on its own. sinks [H] float32
    (attention sinks, GPT-OSS): logits that join the merged denominator once and add no value; the parts must have
    been computed without them. Math in float32; rows with no key and no sink give zeros, as the kernels do.
    Non-contiguous inputs are copied first (what the kernels produce is contiguous already).
    """
    return _ops.merge_attention_states(out_a.contiguous(), lse_a.contiguous(), out_b.contiguous(),
                                       lse_b.contiguous(), sinks, a_rows)


def cascade_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_plan, prefix_layout,
                      suffix_plan, suffix_layout, order: torch.Tensor, inverse: torch.Tensor,
                      group_indptr: torch.Tensor, q_indptr: torch.Tensor, sinks: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """out [T, Hq, D] of causal decode attention (one query per row, q [T, Hq, D]) when groups of rows start with the
    same pages (cascade): the shared pages in key splits, each read once by its group's queries (non-causal: every
    shared key precedes them; prefix_plan over prefix_layout, queries q[order] [S * T] with group_indptr), each row's
    own pages (suffix_plan over suffix_layout with q_indptr), merged by lse in one kernel (a_rows = inverse [T]: each
    row's position in `order`'s first split; sinks join once). Layouts and order as
    flashcore_hf.cache.step_plan.cascade_layouts makes them."""
    out_p, lse_p = prefix_plan.run(q.index_select(0, order), k_cache, v_cache, prefix_layout, group_indptr,
                                   return_lse=True)
    out_s, lse_s = suffix_plan.run(q, k_cache, v_cache, suffix_layout, q_indptr, return_lse=True)
    splits = order.shape[0] // max(q.shape[0], 1)
    return merge_attention_states(out_p.view(splits, *q.shape), lse_p.view(splits, *q.shape[:2]), out_s, lse_s,
                                  sinks, a_rows=inverse)
