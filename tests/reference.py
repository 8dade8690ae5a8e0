"""Float64 reference for paged attention, written independently of the kernels (plain per-sequence loops).

Used by the CPU op tests and the GPU tests alike: the kernels must match this on fresh random inputs.
"""
from __future__ import annotations

import math

import torch


def gather_sequence_kv(k_cache, v_cache, row_offsets, cols, token_counts, b):
    """Keys/values of layout row b in order: [n_k, Hkv, D] each (float64, on CPU)."""
    start, end = int(row_offsets[b]), int(row_offsets[b + 1])
    ks, vs = [], []
    for j in range(start, end):
        page, count = int(cols[j]), int(token_counts[j])
        ks.append(k_cache[page, :count].double().cpu())
        vs.append(v_cache[page, :count].double().cpu())
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    if not ks:
        return torch.zeros(0, hkv, d, dtype=torch.float64), torch.zeros(0, hkv, d, dtype=torch.float64)
    return torch.cat(ks), torch.cat(vs)


def reference_paged_attention(q, k_cache, v_cache, row_offsets, cols, token_counts, q_indptr, *, causal=True,
                              sm_scale=None, sliding_window=None, softcap=None, sinks=None):
    """Float64 (out [total_q, Hq, D], lse [total_q, Hq]) following the contract in DESIGN.md.

    row_offsets has B + 1 entries (one page list per sequence) or B * Hkv + 1 (one per sequence and kv head).
    softcap: scores s -> softcap * tanh(s / softcap). sinks [Hq]: a logit per query head in every row's softmax
    denominator (no value); lse includes it, and rows that see no key get lse = sink.
    """
    row_offsets, cols, token_counts, q_indptr = (t.cpu() for t in (row_offsets, cols, token_counts, q_indptr))
    total_q, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    out = torch.zeros(total_q, hq, d, dtype=torch.float64)
    lse = torch.full((total_q, hq), -math.inf, dtype=torch.float64)
    sink = None if sinks is None else sinks.double().cpu()
    if sink is not None:
        lse[:] = sink
    batch = len(q_indptr) - 1
    per_head = len(row_offsets) - 1 != batch
    for b, h in [(b, h) for b in range(batch) for h in range(hkv)] if per_head else [(b, None) for b in range(batch)]:
        q0, q1 = int(q_indptr[b]), int(q_indptr[b + 1])
        n_q = q1 - q0
        if n_q == 0:
            continue
        k, v = gather_sequence_kv(k_cache, v_cache, row_offsets, cols, token_counts, b * hkv + h if per_head else b)
        heads = slice(None) if h is None else slice(h * group, (h + 1) * group)
        if h is not None:  # only this kv head's keys; its query heads are heads
            k, v = k[:, h:h + 1], v[:, h:h + 1]
        n_k = k.shape[0]
        if n_k == 0:
            continue
        qb = q[q0:q1, heads].double().cpu()                           # [n_q, Hq (or group), D]
        k_rep = k.repeat_interleave(group, dim=1)                      # [n_k, Hq (or group), D]
        v_rep = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qb, k_rep) * scale       # [Hq, n_q, n_k]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(n_q, dtype=torch.int64) + (n_k - n_q)
        k_pos = torch.arange(n_k, dtype=torch.int64)
        visible = torch.ones(n_q, n_k, dtype=torch.bool)
        if causal:
            visible &= k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            visible &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
        scores = scores.masked_fill(~visible, -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)                      # [Hq, n_q]
        if sink is not None:
            row_lse = torch.logaddexp(row_lse, sink[heads, None])
        probs = torch.exp(scores - row_lse[..., None])
        probs = torch.nan_to_num(probs, nan=0.0)                       # rows with no visible key
        out[q0:q1, heads] = torch.einsum("hqk,khd->qhd", probs, v_rep)
        lse[q0:q1, heads] = row_lse.transpose(0, 1)
    return out, lse


def random_paged_kv(lengths, page_size, num_kv_heads, head_dim, *, dtype=torch.float32, device="cpu",
                    extra_pages=3, generator=None):
    """Scatter sequences of the given key lengths over a randomly permuted page pool.

    Returns k_cache, v_cache [num_pages, page_size, Hkv, D] (filled with random data everywhere, so a kernel
    that reads a wrong slot gives a wrong answer) and the CSR layout tensors (row_offsets, cols, token_counts).
    """
    pages_per_seq = [math.ceil(n / page_size) for n in lengths]
    num_pages = sum(pages_per_seq) + extra_pages
    perm = torch.randperm(num_pages, generator=generator)
    k_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=generator).to(dtype).to(device)
    v_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim, generator=generator).to(dtype).to(device)
    row_offsets, cols, counts, used = [0], [], [], 0
    for n, p in zip(lengths, pages_per_seq):
        for j in range(p):
            cols.append(int(perm[used]))
            counts.append(min(page_size, n - j * page_size))
            used += 1
        row_offsets.append(len(cols))
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return k_cache, v_cache, as_i32(row_offsets), as_i32(cols), as_i32(counts)
