"""The paged-attention contract computed with torch SDPA on K/V gathered from the pages.

Used where no compiled kernel applies (`AttentionPlan.supported` is False: e.g. float32 on CUDA, or a head dim the CUDA
kernels lack): same results as the kernels, slower, more memory. Fixed shapes from host-known bounds and no host
sync, so it also runs inside CUDA-graph capture.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import PageLayout


def sdpa_from_pages(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, layout: PageLayout,
                    q_indptr: torch.Tensor, max_q_len: int, max_pages_per_seq: int, *, causal: bool, scale: float,
                    window: int | None, softcap: float | None = None, sinks: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The paged-attention contract (ops.paged_attention) computed with torch SDPA, without a host sync.

    q [total_q, Hq, D]; pools [num_pages, P, Hkv, D]; layout rows per sequence (B + 1 row offsets) or per
    (sequence, kv head) (B * Hkv + 1); q_indptr [B + 1]; max_q_len and max_pages_per_seq are host upper bounds
    (pages per layout row). Each row's keys are gathered into max_pages_per_seq * P slots (valid ones first) and each
    sequence's queries into max_q_len slots. softcap / sinks [Hq]: as in paged_attention (then the scores are
    computed explicitly, as transformers' eager attention does). Returns out [total_q, Hq, D]; query rows that see
    no key are 0.
    """
    total_q, hq, d = q.shape
    page, hkv = k_pool.shape[1], k_pool.shape[2]
    batch, nnz, dev = q_indptr.numel() - 1, layout.cols.numel(), q.device
    if total_q == 0 or nnz == 0 or batch == 0:
        return q.new_zeros(total_q, hq, d)
    groups = (layout.row_offsets.numel() - 1) // batch        # 1: rows shared by all heads; Hkv: a row per kv head
    row_offsets = layout.row_offsets.long().view(-1)
    entry = row_offsets[:-1, None] + torch.arange(max(max_pages_per_seq, 1), device=dev)     # [rows, maxp]
    has_page = entry < row_offsets[1:, None]
    entry = entry.clamp_(max=nnz - 1)
    counts = torch.where(has_page, layout.token_counts.long()[entry], 0)
    offsets = torch.arange(page, device=dev)
    slots = (layout.cols.long()[entry][..., None] * page + offsets).reshape(batch, groups, -1)  # [B, G, L]
    key_valid = (offsets < counts[..., None]).reshape(batch, groups, -1)
    slots = slots.gather(2, torch.argsort((~key_valid).to(torch.int8), dim=2, stable=True))
    n_k = key_valid.sum(dim=2)                                                                  # [B, G]
    k_flat, v_flat = k_pool.reshape(-1, hkv, d), v_pool.reshape(-1, hkv, d)
    if groups == 1:
        k, v = k_flat[slots[:, 0]].transpose(1, 2), v_flat[slots[:, 0]].transpose(1, 2)          # [B, Hkv, L, D]
    else:
        head = torch.arange(hkv, device=dev)[None, :, None]
        k, v = k_flat[slots, head], v_flat[slots, head]

    q_start = q_indptr[:-1].long()
    n_q = q_indptr[1:].long() - q_start
    i = torch.arange(max(max_q_len, 1), device=dev)
    q_rows = q_start[:, None] + i                                                              # [B, Mq]
    q_valid = i < n_q[:, None]
    q_dense = q[q_rows.clamp(max=total_q - 1)].transpose(1, 2)                                # [B, Hq, Mq, D]
    q_pos = (n_k - n_q[:, None])[..., None] + i                                                # [B, G, Mq]
    k_pos = torch.arange(k.shape[2], device=dev)
    visible = k_pos < n_k[..., None, None]                                                     # [B, G, Mq, L]
    if causal:
        visible = visible & (k_pos <= q_pos[..., None])
    if window is not None:
        visible = visible & (q_pos[..., None] - k_pos < window)
    visible = visible.repeat_interleave(hq // groups, dim=1)                                   # [B, Hq, Mq, L]
    if softcap or sinks is not None:
        out = _explicit_attention(q_dense, k, v, visible, scale, softcap, sinks)
    else:
        out = F.scaled_dot_product_attention(q_dense, k, v, attn_mask=visible, scale=scale, enable_gqa=hq != hkv)
    out = torch.where(visible.any(dim=-1, keepdim=True), out, 0).transpose(1, 2)              # [B, Mq, Hq, D]
    packed = q.new_zeros(total_q + 1, hq, d)
    packed[torch.where(q_valid, q_rows, total_q).reshape(-1)] = out.reshape(-1, hq, d)
    return packed[:total_q]



def _explicit_attention(q, k, v, visible, scale: float, softcap: float | None, sinks: torch.Tensor | None):
    """softmax(softcap(q k^T * scale) | sink) v in float32, for q [B, Hq, M, D], k/v [B, Hkv, L, D], visible
    [B, Hq, M, L] (eager attention's formula, where SDPA has no softcap or sink)."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1).float()
    v = v.repeat_interleave(hq // hkv, dim=1).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, hq, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs, v).to(q.dtype)
