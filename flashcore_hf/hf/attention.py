"""`FlashCoreAttention`: the one attention code path of the "flashcore" implementation.

It takes HF-layout queries [B, Hq, S, D] and either
- what `PagedKVCache.update` returned (a PagedKVHandle, resolved here with the forward's padding mask, or an
  already written PagedLayerStep): the compiled kernels read the cache's pages directly, with the step's plan, or
- dense K/V [B, Hkv, S_kv, D] (DynamicCache, StaticCache, no cache): the valid keys of each row are packed into
  pages of `page_size` tokens (one gather copy, like DynamicCache's own per-step `torch.cat`) and the same kernels
  run on that layout.

Padding semantics. The 2-D mask marks valid keys; a row's valid keys are packed to the front of its pages, in order.
Every query column is computed; causal attention lets column c see the row's valid keys at columns <= c (what
eager attention computes, also for padding columns), by cutting the queries into runs aligned bottom-right on a
prefix of the row's keys (flashcore_hf/cache/step_plan.py). Sliding windows count distance in valid tokens: the
same as eager for every real query; a padding query after a row's last real token measures its window from that
token (eager measures it from the padding column).

Fallback. When the kernels lack a configuration (the plan says unsupported: e.g. float32 or head_dim > 256 on
CUDA), the pages are gathered back into dense K/V and torch SDPA computes the same attention
(flashcore_hf/ops/fallback.py), after a one-time `FlashCoreFallbackWarning`. Same results; slower, more memory.
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import nn

from ..cache.handles import PagedKVHandle, PagedLayerStep
from ..cache.step_plan import FULL, PREFIX, SUFFIX, WINDOW, build_layouts, query_runs
from ..layout import PageLayout
from ..ops import AttentionPlan, cascade_attention, plan_attention, sdpa_from_pages

DENSE_PAGE_SIZE = 64
"""Page size used for dense K/V: supported by the CPU kernel and the CUDA decode and prefill kernels."""
SPARSE = "sparse"
"""Attention-plan kind of a sparse layer's selected pages."""


class FlashCoreFallbackWarning(UserWarning):
    """The compiled kernels do not cover a configuration; torch SDPA computes the attention instead."""


class FlashCoreAttention(nn.Module):
    """Attention over dense or paged K/V with the flashcore kernels. Stateless apart from warning bookkeeping and
    per-forward memos of host-side mask analysis.

    page_size: tokens per page when dense K/V are packed into pages (paged input keeps the cache's page size).
    """

    def __init__(self, page_size: int = DENSE_PAGE_SIZE):
        super().__init__()
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = int(page_size)
        self._warned: set[tuple] = set()
        self._packed_memo: tuple | None = None
        self._mask_memo: tuple | None = None

    def forward(self, query: torch.Tensor, key, value, attention_mask: torch.Tensor | None = None, *,
                scaling: float | None = None, sliding_window: int | None = None, is_causal: bool = True,
                softcap: float | None = None, sinks: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output [B, S, Hq, D] in query's dtype (the memory order HF's o_proj expects).

        query [B, Hq, S, D]. key, value: dense [B, Hkv, S_kv, D] (Hq a multiple of Hkv), or what PagedKVCache.update
        returned (the same object twice; the mask then says which of the step's new tokens are padding).
        attention_mask: None or bool/int [B, M] with M <= S_kv: key column c is valid iff c < M and mask[b, c]
            (columns from M on are unused cache slots, e.g. a StaticCache's tail); the queries are the last S
            columns of the M.
        scaling: softmax scale (default D ** -0.5). sliding_window: a key is visible iff query_pos - key_pos <
            sliding_window. is_causal: causal masking (bottom-right aligned). softcap: logit softcapping (Gemma 2/3).
            sinks [Hq]: attention-sink logits (GPT-OSS).
        position_ids [B, S] / cu_seq_lens [n + 1]: only read for one dense row without mask and without past
            (S_kv == S): several sequences packed in the row (positions restarting, as transformers detects them)
            attend only within themselves.
        """
        if query.dim() != 4:
            raise ValueError(f"query must be [B, Hq, S, D], got {tuple(query.shape)}")
        options = dict(scale=query.shape[-1] ** -0.5 if scaling is None else float(scaling),
                       window=None if sliding_window is None else int(sliding_window), causal=bool(is_causal),
                       softcap=float(softcap) if softcap else None,
                       sinks=None if sinks is None else sinks.detach().to(torch.float32).contiguous())
        if isinstance(key, PagedKVHandle):
            key = key.resolve(attention_mask)
        if isinstance(key, PagedLayerStep):
            return self._paged(query, key, **options)
        if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor):
            raise TypeError(f"key/value must be dense tensors or what PagedKVCache.update returned, got "
                            f"{type(key).__name__} and {type(value).__name__}")
        return self._dense(query, key, value, attention_mask, position_ids, cu_seq_lens, **options)

    # ---- paged K/V (PagedKVCache) ---------------------------------------------------------------------------

    def _paged(self, query, layer: PagedLayerStep, *, scale, window, causal, softcap, sinks) -> torch.Tensor:
        b, hq, s, d = query.shape
        q = query.transpose(1, 2).reshape(b * s, hq, d)  # a view for decode (S == 1)
        step, page, hkv = layer.step, layer.page_size, layer.num_kv_heads
        if not causal and not step.runs_are_rows:
            raise NotImplementedError("flashcore: non-causal attention over a step whose new tokens include padding "
                                      "between real tokens is not supported; use attn_implementation='sdpa'")
        plan_options = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=page, dtype=q.dtype,
                            causal=causal, sm_scale=scale, window=window, softcap=softcap)
        if window is not None and window == step.window:
            layout = layer.device_step.layouts[WINDOW]
            plan = step.attention_plan(q.device, WINDOW, **plan_options)
        elif window is None and layer.selector is not None:
            # Sparse decode step: the pages this layer's policy selects. (Windowed layers read their window: counted
            # in positions, which a subset of pages would shift.)
            layout = layer.select_pages(q)
            plan = step.attention_plan(q.device, SPARSE, rows=layout.row_offsets.numel() - 1,
                                       max_pages=layer.selector.max_pages_per_row, nnz=layout.cols.numel(),
                                       **plan_options)
        else:
            if layer.device_step.cascade is not None and causal and window is None:
                out = self._cascade(q, layer, plan_options, sinks)
                if out is not None:
                    return out.view(b, s, hq, d)
            layout = layer.layout
            plan = step.attention_plan(q.device, FULL, **plan_options)
        out = self._run(plan, q, layer.k_cache, layer.v_cache, layout, layer.q_indptr, window, softcap, sinks)
        return out.view(b, s, hq, d)

    def _cascade(self, q, layer: PagedLayerStep, plan_options: dict, sinks) -> torch.Tensor | None:
        """Decode over shared prompt pages (step_plan.py, "Cascade"; ops.cascade_attention). None when a kernel lacks
        the configuration."""
        step, cascade = layer.step, layer.device_step.cascade
        prefix_plan = step.attention_plan(q.device, PREFIX, **{**plan_options, "causal": False})
        suffix_plan = step.attention_plan(q.device, SUFFIX, **plan_options)
        if not (prefix_plan.supported and suffix_plan.supported):
            return None
        layouts = layer.device_step.layouts
        return cascade_attention(q, layer.k_cache, layer.v_cache, prefix_plan, layouts[PREFIX], suffix_plan,
                                 layouts[SUFFIX], cascade.order, cascade.inverse, cascade.group_indptr,
                                 layer.q_indptr, sinks)

    # ---- dense K/V (DynamicCache / StaticCache / no cache) --------------------------------------------------

    def _dense(self, query, key, value, mask, position_ids, cu_seq_lens, *, scale, window, causal, softcap,
               sinks) -> torch.Tensor:
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
        q = query.transpose(1, 2).reshape(b * s_q, hq, d)
        bounds = None
        if mask is None and b == 1 and s_q > 1 and s_kv == s_q:
            bounds = self._packed_bounds(position_ids, cu_seq_lens, s_q)
        if bounds is not None:  # one row holding several packed sequences: one layout row per sequence
            lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
            padded = _round_up(max(lengths), page)
            starts = torch.tensor(bounds[:-1], device=dev)
            token_index = (starts[:, None] + torch.arange(padded, device=dev)).clamp_(max=s_kv - 1)
            row_index = torch.zeros(len(lengths), 1, dtype=torch.long, device=dev)
            k_pool, v_pool, layout = _pages_from_rows(key, value, row_index, token_index,
                                                      torch.tensor(lengths, device=dev), page)
            q_indptr = torch.tensor(bounds, dtype=torch.int32, device=dev)
            max_q_len, max_pages = max(lengths), padded // page
        else:
            padded = _round_up(s_kv, page)
            # Slots past the row's keys repeat its last token: they fill the partial last page, never read.
            token_index = torch.arange(padded, device=dev).clamp_(max=s_kv - 1).expand(b, padded)
            row_index = torch.arange(b, device=dev)[:, None]
            if mask is None:
                k_pool, v_pool, layout = _pages_from_rows(key, value, row_index, token_index,
                                                          torch.full((b,), s_kv, device=dev), page)
                q_indptr = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32, device=dev)
                max_q_len, max_pages = s_q, padded // page
            else:
                # Valid keys first, in order (a stable sort), then the step's query runs over them.
                token_index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True).gather(1, token_index)
                k_pool, v_pool, _ = _pages_from_rows(key, value, row_index, token_index, mask.sum(dim=1), page)
                layout, q_indptr, max_q_len, max_pages = self._masked_runs(mask, s_q, padded // page, dev)
        plan = plan_attention(layout, q_indptr, num_q_heads=hq, num_kv_heads=key.shape[1], head_dim=d,
                              page_size=page, dtype=q.dtype, total_q=q.shape[0], causal=causal, sm_scale=scale,
                              sliding_window=window, softcap=softcap, max_q_len=max_q_len,
                              max_pages_per_seq=max_pages, exact=True, allocate_workspace=False)
        out = self._run(plan, q, k_pool, v_pool, layout, q_indptr, window, softcap, sinks)
        return out.view(1, s_q, hq, d) if bounds is not None else out.view(b, s_q, hq, d)

    def _masked_runs(self, mask: torch.Tensor, s_q: int, pages_per_row: int, device):
        """(layout, q_indptr, max_q_len, max_pages) of the query runs of a padded dense batch whose row b's valid keys
        fill pages b * pages_per_row, .... Needs the mask on the host (one copy); every layer of a forward gets the
        same mask tensor, so the answer is remembered for it."""
        memo, key = self._mask_memo, (_version(mask), s_q, pages_per_row, device)
        if memo is not None and memo[0]() is mask and memo[1] == key:
            return memo[2]
        host = mask.to("cpu", torch.bool)
        past = host[:, :host.shape[1] - s_q].sum(dim=1).tolist()
        new = host[:, host.shape[1] - s_q:]
        runs = query_runs(past, None if bool(new.all()) else new.tolist(), s_q)
        tables = [list(range(b * pages_per_row, (b + 1) * pages_per_row)) for b in range(host.shape[0])]
        layouts, largest = build_layouts(runs, tables, self.page_size, window=None)
        layout = layouts[FULL].to(device)
        q_indptr = torch.tensor(runs.starts, dtype=torch.int32).to(device)
        max_q_len = max(runs.starts[r + 1] - runs.starts[r] for r in range(len(runs.rows)))
        result = (layout, q_indptr, max_q_len, largest[FULL])
        self._mask_memo = (weakref.ref(mask), key, result)
        return result

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
        if memo is not None and memo[0]() is position_ids and memo[1] == _version(position_ids):
            return memo[2]
        steps = torch.diff(position_ids.reshape(-1))
        starts = (torch.nonzero(steps != 1).flatten() + 1).tolist()
        bounds = [0, *starts, length] if starts else None
        self._packed_memo = (weakref.ref(position_ids), _version(position_ids), bounds)
        return bounds

    # ---- kernel or fallback ---------------------------------------------------------------------------------

    def _run(self, plan: AttentionPlan, q, k_pool, v_pool, layout: PageLayout, q_indptr, window, softcap,
             sinks) -> torch.Tensor:
        """out [total_q, Hq, D] for packed queries q [total_q, Hq, D] over pools [num_pages, P, Hkv, D]."""
        if plan.supported:
            return plan.run(q, k_pool, v_pool, layout, q_indptr, sinks=sinks)
        hq, d = q.shape[1], q.shape[2]
        page, hkv = k_pool.shape[1], k_pool.shape[2]
        reason = (q.device.type, q.dtype, d, page, hq, hkv)
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"flashcore kernels do not support device={q.device.type}, dtype={q.dtype}, head_dim={d}, "
                f"page_size={page}, heads={hq}/{hkv} (max_q_len={plan.max_q_len}); falling back to torch SDPA on "
                "K/V gathered from the pages (same results, slower, more memory).", FlashCoreFallbackWarning,
                stacklevel=5)
        return sdpa_from_pages(q, k_pool, v_pool, layout, q_indptr, plan.max_q_len, plan.max_pages_per_seq,
                               causal=plan.causal, scale=plan.sm_scale, window=window, softcap=softcap, sinks=sinks)


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


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (what a per-forward memo keys on); None for inference tensors,
    which keep none (they are created under inference_mode and are then not modified in place by the model)."""
    return None if tensor.is_inference() else tensor._version


def _round_up(n: int, multiple: int) -> int:
    return max(1, math.ceil(n / multiple)) * multiple
