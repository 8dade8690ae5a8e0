"""Attention over the union of two disjoint key sets from the attention over each (what cascade decode needs: a
shared prompt's pages read once for a group of sequences, each sequence's own pages read separately)."""
from __future__ import annotations

import torch

from .library import _ops


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                           sinks: torch.Tensor | None = None, a_rows: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, H, D] (out_b's dtype) of softmax attention over keys A and B together, in one kernel.

    out_b [T, H, D], lse_b [T, H]: attention over B alone (normalised over its own keys) and its natural-log
    sum-exp of the scaled scores (float32; -inf: no key, its out rows are zeros). out_a [T_a, H, D], lse_a [T_a, H]:
    the same over A, row a_rows[t] for output row t (a_rows [T] int32; None: row t, T_a = T). sinks [H] float32
    (attention sinks, GPT-OSS): logits that join the merged denominator once and add no value; the parts must have
    been computed without them. Math in float32; rows with no key and no sink give zeros, as the kernels do.
    Non-contiguous inputs are copied first (what the kernels produce is contiguous already).
    """
    return _ops.merge_attention_states(out_a.contiguous(), lse_a.contiguous(), out_b.contiguous(),
                                       lse_b.contiguous(), sinks, a_rows)
