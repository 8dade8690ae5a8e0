"""Attention over the union of two disjoint key sets from the attention over each (what cascade decode needs: a
shared prompt's pages read once for a group of sequences, each sequence's own pages read separately)."""
from __future__ import annotations

import torch


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, H, D] (out_a's dtype) of softmax attention over keys A and B together.

    out_a, out_b [T, H, D]: attention over A and over B alone (each normalised over its own keys); lse_a, lse_b
    [T, H] float32: their natural-log sum-exp of the scaled scores (-inf: no key, that part's out rows are zeros).
    sinks [H] float32 (attention sinks, GPT-OSS): logits that join the merged denominator once and add no value; the
    parts must have been computed without them. Rows with no key and no sink give zeros, as the kernels do.
    """
    m = torch.maximum(lse_a, lse_b)
    if sinks is not None:
        m = torch.maximum(m, sinks)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))      # no key at all: every weight below is 0
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    denom = w_a + w_b
    if sinks is not None:
        denom = denom + torch.exp(sinks - m)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    merged = out_a.float() * (w_a / denom).unsqueeze(-1) + out_b.float() * (w_b / denom).unsqueeze(-1)
    return merged.to(out_a.dtype)
