"""`FlashCoreAttention`: the one attention code path of the "flashcore" implementation.

It takes HF-layout queries [B, Hq, S, D] and either
- a `PagedKVHandle` (what `PagedKVCache.update` returns): the compiled kernel reads the cache's pages directly, or
- dense K/V [B, Hkv, S_kv, D] (DynamicCache, StaticCache, no cache): the valid keys of each row are packed into
  pages of `page_size` tokens (one gather copy, like DynamicCache's own per-step `torch.cat`) and the same kernel
  runs on that layout.

Padding semantics (dense input). The 2-D mask marks valid keys; valid keys are packed to the front of each row in
order, and queries are aligned bottom-right on the packed keys, which is what FlashAttention's unpadding does.
Causal attention is then exactly the masked causal attention of SDPA for any mask. With a sliding window the
distance is counted in valid tokens, so it equals SDPA's for left or right padding (the only padding generate and
tokenizers produce) and follows FlashAttention when a row has holes in the middle.

Fallback. When the kernels lack this configuration (`ops.kernel_supports`: e.g. float32 or head_dim > 256 on
CUDA), the pages are gathered back into dense K/V and torch SDPA computes the same attention, after a one-time
`FlashCoreFallbackWarning`. Results are the same; only speed and memory differ.
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .cache_handle import PagedKVHandle
from .layout import PageLayout
from .ops import kernel_supports, paged_attention
from .sparse.selection import SparsePagedKVHandle

DENSE_PAGE_SIZE = 64
"""Page size used for dense K/V: supported by the CPU kernel and the CUDA decode and prefill kernels."""


class FlashCoreFallbackWarning(UserWarning):
    """The compiled kernels do not cover a configuration; torch SDPA computes the attention instead."""


class FlashCoreAttention(nn.Module):
    """Attention over dense or paged K/V with the flashcore kernels. Stateless apart from warning bookkeeping.

    page_size: tokens per page when dense K/V are packed into pages (paged input keeps the cache's page size).
    """

    def __init__(self, page_size: int = DENSE_PAGE_SIZE):
        super().__init__()
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = int(page_size)
        self._warned: set[tuple] = set()
        self._packed_memo: tuple | None = None

    def forward(self, query: torch.Tensor, key, value, attention_mask: torch.Tensor | None = None, *,
                scaling: float | None = None, sliding_window: int | None = None, is_causal: bool = True,
                position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output [B, S, Hq, D] in query's dtype (the memory order HF's o_proj expects).

        query [B, Hq, S, D]. key, value: dense [B, Hkv, S_kv, D] (Hq a multiple of Hkv), or the same PagedKVHandle
        twice (then attention_mask is ignored: the cache already left the padding out of its pages).
        attention_mask: None or bool/int [B, M] with M <= S_kv: key column c is valid iff c < M and mask[b, c]
            (columns from M on are unused cache slots, e.g. a StaticCache's tail); the queries are the last S
            columns of the M. Rows with padding inside the query span are handled (right padding).
        scaling: softmax scale (default D ** -0.5). sliding_window: a key is visible iff query_pos - key_pos <
            sliding_window. is_causal: causal masking (bottom-right aligned).
        position_ids [B, S] / cu_seq_lens [n + 1]: only read for one dense row without mask and without past
            (S_kv == S): several sequences packed in the row (positions restarting, as transformers detects them)
            attend only within themselves.
        """
        if query.dim() != 4:
            raise ValueError(f"query must be [B, Hq, S, D], got {tuple(query.shape)}")
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        window = None if sliding_window is None else int(sliding_window)
        if isinstance(key, PagedKVHandle):
            return self._paged(query, key, scale, window, bool(is_causal))
        if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
            raise TypeError(f"key/value must be dense tensors or a PagedKVHandle, got {type(key).__name__} and "
                            f"{type(value).__name__}")
        return self._dense(query, key, value, attention_mask, scale, window, bool(is_causal), position_ids,
                           cu_seq_lens)

    # ---- paged K/V (PagedKVCache) ---------------------------------------------------------------------------

    def _paged(self, query, handle: PagedKVHandle, scale, window, causal) -> torch.Tensor:
        b, hq, s, d = query.shape
        q = query.transpose(1, 2).reshape(b * s, hq, d)  # a view for decode (S == 1)
        layout, max_pages = handle.layout, handle.max_pages_per_seq
        if (window is None and isinstance(handle, SparsePagedKVHandle)
                and kernel_supports(q.device, q.dtype, d, handle.k_cache.shape[1], handle.max_q_len, hq,
                                    handle.k_cache.shape[2])):
            # Sparse decode step: the pages this layer's policy selects. Dense instead for sliding windows (counted in
            # positions, which a subset of pages would shift) and for the SDPA fallback (per-sequence layouts only).
            layout, max_pages = handle.select_layout(q)
        out = self._attend(q, handle.k_cache, handle.v_cache, layout, handle.q_indptr, handle.max_q_len, max_pages,
                           causal, scale, window, handle.workspace)
        return out.view(b, s, hq, d)

    # ---- dense K/V (DynamicCache / StaticCache / no cache) --------------------------------------------------

    def _dense(self, query, key, value, mask, scale, window, causal, position_ids, cu_seq_lens) -> torch.Tensor:
        b, hq, s_q, d = query.shape
        if key.dim() != 4 or value.shape != key.shape or key.shape[0] != b or key.shape[-1] != d:
            raise ValueError(f"key and value must both be [B={b}, Hkv, S_kv, D={d}], got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        if mask is not None:
            mask = _valid_key_mask(mask, b, s_q, key.shape[2], key.device)
            key, value = key[:, :, :mask.shape[1]], value[:, :, :mask.shape[1]]
        s_kv = key.shape[2]
        if s_q == 0:
            return query.new_empty(b, 0, hq, d)
        if s_kv < s_q:
            raise ValueError(f"dense attention needs at least as many keys ({s_kv}) as queries ({s_q})")
        page, dev = self.page_size, query.device
        bounds = None
        if mask is None and b == 1 and s_q > 1 and s_kv == s_q:
            bounds = self._packed_bounds(position_ids, cu_seq_lens, s_q)

        q_order = None
        if bounds is not None:  # one row holding several packed sequences: one layout row per sequence
            lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
            padded = _round_up(max(lengths), page)
            starts = torch.tensor(bounds[:-1], device=dev)
            token_index = (starts[:, None] + torch.arange(padded, device=dev)).clamp_(max=s_kv - 1)
            row_index = torch.zeros(len(lengths), 1, dtype=torch.long, device=dev)
            n_keys = torch.tensor(lengths, device=dev)
            q = query.transpose(1, 2).reshape(s_q, hq, d)
            q_indptr = torch.tensor(bounds, dtype=torch.int32, device=dev)
            max_q_len = max(lengths)
        else:
            padded = _round_up(s_kv, page)
            # Slots past the row's keys repeat its last token: they fill the partial last page, never read.
            token_index = torch.arange(padded, device=dev).clamp_(max=s_kv - 1).expand(b, padded)
            row_index = torch.arange(b, device=dev)[:, None]
            qt = query.transpose(1, 2)  # [B, S, Hq, D]
            if mask is None:
                n_keys = torch.full((b,), s_kv, device=dev)
            else:
                # Stable sorts: valid keys first in order; padding queries first, then the valid ones in order, so
                # valid queries sit bottom-right on the packed keys.
                key_order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
                token_index = key_order.gather(1, token_index)
                n_keys = mask.sum(dim=1)
                q_order = torch.argsort(mask[:, s_kv - s_q:].to(torch.int8), dim=1, stable=True)
                qt = qt[row_index, q_order]
            q = qt.reshape(b * s_q, hq, d)
            q_indptr = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32, device=dev)
            max_q_len = s_q

        k_pool, v_pool, layout = _pages_from_rows(key, value, row_index, token_index, n_keys, page)
        out = self._attend(q, k_pool, v_pool, layout, q_indptr, max_q_len, padded // page, causal, scale, window,
                           None)
        if bounds is not None:
            return out.view(1, s_q, hq, d)
        out = out.view(b, s_q, hq, d)
        if q_order is not None:
            unpermuted = torch.empty_like(out)
            unpermuted[row_index, q_order] = out
            out = unpermuted
        return out

    def _packed_bounds(self, position_ids, cu_seq_lens, length) -> list[int] | None:
        """Sequence boundaries [0, ..., length] of a packed row, or None for a single sequence.

        From cu_seq_lens when given, else where position_ids do not step by exactly 1 (transformers'
        find_packed_sequence_indices rule). Reading them is a host sync; every layer of a forward gets the same
        position_ids tensor, so the answer is remembered for that tensor.
        """
        if cu_seq_lens is not None:
            bounds = [int(x) for x in cu_seq_lens.tolist()]
            if bounds[0] != 0 or bounds[-1] != length or any(e <= s for s, e in zip(bounds[:-1], bounds[1:])):
                raise ValueError(f"cu_seq_lens must rise strictly from 0 to {length}, got {bounds}")
            return bounds if len(bounds) > 2 else None
        if position_ids is None or position_ids.numel() != length:
            return None
        memo = self._packed_memo
        if memo is not None and memo[0]() is position_ids and memo[1] == position_ids._version:
            return memo[2]
        steps = torch.diff(position_ids.reshape(-1))
        starts = (torch.nonzero(steps != 1).flatten() + 1).tolist()
        bounds = [0, *starts, length] if starts else None
        self._packed_memo = (weakref.ref(position_ids), position_ids._version, bounds)
        return bounds

    # ---- kernel or fallback ---------------------------------------------------------------------------------

    def _attend(self, q, k_pool, v_pool, layout: PageLayout, q_indptr, max_q_len, max_pages_per_seq, causal,
                scale, window, workspace) -> torch.Tensor:
        """out [total_q, Hq, D] for packed queries q [total_q, Hq, D] over pools [num_pages, P, Hkv, D]."""
        hq, d = q.shape[1], q.shape[2]
        page, hkv = k_pool.shape[1], k_pool.shape[2]
        if kernel_supports(q.device, q.dtype, d, page, max_q_len, hq, hkv):
            return paged_attention(q, k_pool, v_pool, layout, q_indptr, causal=causal, sm_scale=scale,
                                   sliding_window=window, max_q_len=max_q_len,
                                   max_pages_per_seq=max_pages_per_seq, workspace=workspace)
        reason = (q.device.type, q.dtype, d, page, hq, hkv)
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"flashcore kernels do not support device={q.device.type}, dtype={q.dtype}, head_dim={d}, "
                f"page_size={page}, heads={hq}/{hkv} (max_q_len={max_q_len}); falling back to torch SDPA on K/V "
                "gathered from the pages (same results, slower, more memory).", FlashCoreFallbackWarning,
                stacklevel=4)
        return sdpa_from_pages(q, k_pool, v_pool, layout, q_indptr, max_q_len, max_pages_per_seq, causal=causal,
                               scale=scale, window=window)


def sdpa_from_pages(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, layout: PageLayout,
                    q_indptr: torch.Tensor, max_q_len: int, max_pages_per_seq: int, *, causal: bool, scale: float,
                    window: int | None) -> torch.Tensor:
    """The paged-attention contract (ops.paged_attention) computed with torch SDPA, without a host sync.

    q [total_q, Hq, D]; pools [num_pages, P, Hkv, D]; layout rows per sequence (B + 1 row offsets) or per
    (sequence, kv head) (B * Hkv + 1); q_indptr [B + 1]; max_q_len and max_pages_per_seq are host upper bounds
    (pages per layout row). Each row's keys are gathered into max_pages_per_seq * P slots (valid ones first) and each
    sequence's queries into max_q_len slots. Returns out [total_q, Hq, D]; query rows that see no key are 0.
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
    out = F.scaled_dot_product_attention(q_dense, k, v, attn_mask=visible, scale=scale, enable_gqa=hq != hkv)
    out = torch.where(visible.any(dim=-1, keepdim=True), out, 0).transpose(1, 2)              # [B, Mq, Hq, D]
    packed = q.new_zeros(total_q + 1, hq, d)
    packed[torch.where(q_valid, q_rows, total_q).reshape(-1)] = out.reshape(-1, hq, d)
    return packed[:total_q]


def _pages_from_rows(key, value, row_index, token_index, n_keys, page: int):
    """Pack dense K/V into pages: layout row r holds tokens token_index[r] of batch row row_index[r].

    key, value [B, Hkv, S_kv, D]; row_index [R, 1] (or [R]) and token_index [R, L] int64, L a multiple of `page`;
    n_keys [R]: the first n_keys[r] of row r's L tokens are its keys (the rest only fill the last page). Returns
    pools [R * L / page, page, Hkv, D] (one gather copy each) and the PageLayout (row r reads pages
    r * L / page ... (r + 1) * L / page - 1; trailing pages of short rows have token count 0).
    """
    rows, length = token_index.shape
    pages_per_row, hkv, d, dev = length // page, key.shape[1], key.shape[-1], key.device
    k_pool = key.transpose(1, 2)[row_index, token_index].view(-1, page, hkv, d)
    v_pool = value.transpose(1, 2)[row_index, token_index].view(-1, page, hkv, d)
    first_token = torch.arange(0, length, page, device=dev)
    layout = PageLayout(
        row_offsets=torch.arange(0, (rows + 1) * pages_per_row, pages_per_row, dtype=torch.int32, device=dev),
        cols=torch.arange(rows * pages_per_row, dtype=torch.int32, device=dev),
        token_counts=(n_keys[:, None] - first_token).clamp_(0, page).to(torch.int32).reshape(-1),
        staging_ids=torch.full((rows * pages_per_row,), -1, dtype=torch.int32, device=dev))
    return k_pool, v_pool, layout


def _valid_key_mask(mask, batch: int, s_q: int, s_kv: int, device) -> torch.Tensor:
    """The [B, M] bool valid-key mask (M <= s_kv) for dense K/V from a 2-D padding mask."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise ValueError(
            f"flashcore takes a 2-D padding mask [B, kv_len] (or None), got {shape}: custom 4-D masks and "
            "BlockMasks are not supported; load the model with attn_implementation='sdpa' or 'eager' for those")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask has {mask.shape[0]} rows for a batch of {batch}")
    if mask.shape[1] > s_kv:  # a mask over more tokens than the keys (sliding caches): its last columns
        mask = mask[:, -s_kv:]
    if mask.shape[1] < s_q:
        raise ValueError(f"attention_mask covers {mask.shape[1]} keys, fewer than the {s_q} queries")
    return mask.to(device=device, dtype=torch.bool).expand(batch, -1)


def _round_up(n: int, multiple: int) -> int:
    return max(1, math.ceil(n / multiple)) * multiple
