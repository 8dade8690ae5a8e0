"""Plan once, run many: how a paged-attention call is partitioned, decided once from host-known metadata.

`plan_attention(...)` looks at what is known on the host (shapes, and the layout / query offsets when they are CPU
tensors or host copies are given) and decides, in the compiled planner (`torch.ops.flashcore.plan_paged_attention`),
which kernel runs (CPU, CUDA split-KV decode, CUDA prefill: wgmma on Hopper or mma.sync), the bounds the kernel grid
is sized by, the split-KV partition and the workspace. `AttentionPlan.run(q, k_cache, v_cache)` then launches with
that plan: no hint, no host sync, no allocation besides the output (the workspace belongs to the plan), so it is
safe inside CUDA-graph capture and can be run by every layer of a step and by every replay of a graph (FlashInfer's
plan()/run() wrappers and FA3's scheduler metadata work the same way).

Bounds. From host metadata the plan is exact. With the metadata only on the device and no host copy, the plan needs
no sync when the batch looks like decode (at most 16 queries per sequence on average): its bounds come from the
shapes (queries <= total_q, pages <= the layout's entries; the split-KV partition from the average row) and the
decode kernel covers any query count; otherwise (prefill-like batches) the offsets are copied to the host once.
Caller-given hints (max_q_len, max_pages_per_seq) are checked against the metadata, on CUDA as on the CPU.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch

from ..layout import PageLayout
from .library import _ops

KERNELS = {-1: "unsupported", 0: "cpu", 1: "decode", 2: "prefill_mma", 3: "prefill_wgmma", 4: "cpu_decode"}
"""Kernel ids the compiled planner returns (csrc/bindings/plan.h)."""
_SPLIT_COUNTER_BYTES = 5
"""Index of split_counter_bytes in the planner's data (AttentionPlanData::encode, csrc/bindings/plan.h)."""
DECODE_QUERIES_PER_SEQUENCE = 16
"""At most this many queries per sequence (on average, for shape-only plans) take the split-KV decode kernel: the
compiled planner's kDecodeQueriesPerSequence (csrc/bindings/plan.h; tests/test_ops_paged_attention.py checks they
agree). Python needs it to know, before planning, whether a plan from the shapes alone will do (no host sync)."""


@dataclass(frozen=True)
class AttentionPlan:
    """One planned paged-attention configuration (see the module docstring).

    It holds no metadata tensor: `run` takes the layout and q_indptr, whose values may change between runs (every
    layer of a step, CUDA-graph buffers reloaded between replays, a sparse layer's own page lists) as long as they
    stay within the plan's bounds and shapes (checked by the op). kernel: a name of KERNELS. max_q_len,
    max_pages_per_seq: the bounds the kernels are sized by. splits: split-KV blocks per (sequence, kv head) of the
    decode kernels (CUDA "decode", CPU "cpu_decode"). data: the plan as the compiled op takes it. workspace: float32
    scratch of their split partials, zeroed when the plan is made: its first `split_counter_bytes` bytes are the
    CUDA decode kernel's split counters, which every run leaves at zero (so runs of one plan must not overlap).
    """

    causal: bool
    sm_scale: float
    window: int
    softcap: float
    kernel: str
    max_q_len: int
    max_pages_per_seq: int
    splits: int
    data: tuple[int, ...] = field(repr=False)
    workspace: torch.Tensor | None = field(default=None, repr=False)

    @property
    def split_counter_bytes(self) -> int:
        """Bytes at the start of `workspace` holding the split counters (0 when the kernel does not split)."""
        return self.data[_SPLIT_COUNTER_BYTES]

    @property
    def supported(self) -> bool:
        """Whether a compiled kernel runs this plan (else: flashcore_hf.ops.fallback computes it with SDPA)."""
        return self.kernel != "unsupported"

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: PageLayout,
            q_indptr: torch.Tensor, *, sinks: torch.Tensor | None = None, return_lse: bool = False):
        """out [total_q, Hq, D] (and lse [total_q, Hq] float32 with return_lse) for packed queries q [total_q, Hq, D]
        over pools [num_pages, page_size, Hkv, D], with the metadata the plan was made for (same shapes, values
        within its bounds); sinks [Hq] float32 (attention sinks) or None."""
        out, lse = _ops.paged_attention(q, k_cache, v_cache, layout.row_offsets, layout.cols, layout.token_counts,
                                        q_indptr, self.causal, self.sm_scale, self.window, self.softcap, sinks,
                                        list(self.data), self.workspace)
        return (out, lse) if return_lse else out


def plan_attention(layout: PageLayout, q_indptr: torch.Tensor, *, num_q_heads: int, num_kv_heads: int,
                   head_dim: int, page_size: int, dtype: torch.dtype, total_q: int | None = None,
                   causal: bool = True, sm_scale: float | None = None, sliding_window: int | None = None,
                   softcap: float | None = None, max_q_len: int | None = None, max_pages_per_seq: int | None = None,
                   exact: bool = False, host_metadata: tuple[torch.Tensor, torch.Tensor] | None = None,
                   allocate_workspace: bool = True) -> AttentionPlan:
    """An AttentionPlan for queries described by q_indptr [B + 1] over `layout` (on the device the call runs on;
    the plan is valid for any metadata of the same shapes within its bounds).

    total_q: rows of the packed queries (default q_indptr's last value, read on the host when needed).
    max_q_len / max_pages_per_seq: bounds the caller knows; with exact=True they are trusted (the HF cache plans
    them from its page tables; values within them may change between runs), otherwise they are hints, checked
    against the metadata. host_metadata: (row_offsets, q_indptr) copies on the CPU, if the caller has them.
    allocate_workspace: False leaves the decode kernel's scratch to each run (the op allocates it per call, as the
    one-shot paged_attention does); True gives the plan its own (zeroed once), so runs allocate nothing.
    """
    device = q_indptr.device
    if sm_scale is None:
        sm_scale = head_dim ** -0.5
    if sliding_window is not None and int(sliding_window) <= 0:
        raise ValueError(f"sliding_window must be a positive number of tokens or None, got {sliding_window}")
    batch, rows, nnz = q_indptr.numel() - 1, layout.row_offsets.numel() - 1, layout.cols.numel()
    if host_metadata is None and device.type == "cpu":
        host_metadata = (layout.row_offsets, q_indptr)
    if total_q is None:
        total_q = int((host_metadata[1] if host_metadata is not None else q_indptr)[-1]) if batch >= 0 else 0
    hinted = max_q_len is not None or max_pages_per_seq is not None
    if not exact:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        decode_like = total_q <= DECODE_QUERIES_PER_SEQUENCE * max(batch, 1)
        if host_metadata is None and not capturing and (hinted or not decode_like):
            host_metadata = (layout.row_offsets.cpu(), q_indptr.cpu())          # one host sync
        if host_metadata is not None:
            row_offsets_host, q_indptr_host = host_metadata
            _check_hint(max_q_len, q_indptr_host, "max_q_len", "sequence", "queries")
            _check_hint(max_pages_per_seq, row_offsets_host, "max_pages_per_seq", "layout row", "pages")
            max_q_len, max_pages_per_seq = _largest_gap(q_indptr_host), _largest_gap(row_offsets_host)
            exact = True
        else:                       # shape-only bounds, no sync: every value they could take is covered
            max_q_len, max_pages_per_seq = total_q, nnz
    max_q_len = max(0, int(max_q_len if max_q_len is not None else total_q))
    max_pages_per_seq = max(0, int(max_pages_per_seq if max_pages_per_seq is not None else nnz))
    data = _planner(device.type, -1 if device.index is None else device.index, dtype, head_dim, page_size,
                    num_q_heads, num_kv_heads, batch, rows, total_q, nnz, max_q_len, max_pages_per_seq, bool(exact),
                    bool(causal), 0 if sliding_window is None else int(sliding_window),
                    (os.environ.get("FLASHCORE_PREFILL_KERNEL"), torch.get_num_threads() if device.type == "cpu" else 0))
    kernel, max_q_len, max_pages_per_seq, splits, workspace_bytes = data[:5]
    workspace = None
    if workspace_bytes > 0 and allocate_workspace:
        workspace = torch.zeros(math.ceil(workspace_bytes / 4), dtype=torch.float32, device=device)
    return AttentionPlan(bool(causal), float(sm_scale), 0 if sliding_window is None else int(sliding_window),
                         float(softcap or 0.0), KERNELS[kernel], max_q_len, max_pages_per_seq, splits, data,
                         workspace)


@functools.lru_cache(maxsize=1024)
def _planner(*args) -> tuple[int, ...]:
    """The compiled planner (torch.ops.flashcore.plan_paged_attention): a pure function of host-known values, so it
    is memoised. The last argument is part of the key only, for what the planner also reads: FLASHCORE_PREFILL_KERNEL
    and, on the CPU, torch's thread count (it sets the decode kernel's key splits)."""
    return tuple(_ops.plan_paged_attention(*args[:-1]))


def _largest_gap(offsets: torch.Tensor) -> int:
    """max_i offsets[i + 1] - offsets[i] of a CPU offsets tensor (0 when empty)."""
    gaps = offsets[1:] - offsets[:-1]
    return int(gaps.max()) if gaps.numel() else 0


def _check_hint(hint: int | None, offsets: torch.Tensor, name: str, item: str, unit: str) -> None:
    """RuntimeError naming the first row that exceeds a caller's bound (the same check on CPU and CUDA)."""
    if hint is None:
        return
    gaps = offsets[1:] - offsets[:-1]
    over = torch.nonzero(gaps > int(hint)).flatten()
    if over.numel():
        row = int(over[0])
        verb = "has" if unit == "queries" else "reads"
        raise RuntimeError(f"paged_attention: {name} = {int(hint)} but {item} {row} {verb} {int(gaps[row])} {unit}")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: PageLayout,
                    q_indptr: torch.Tensor, *, causal: bool = True, sm_scale: float | None = None,
                    sliding_window: int | None = None, softcap: float | None = None,
                    sinks: torch.Tensor | None = None, return_lse: bool = False, max_q_len: int | None = None,
                    max_pages_per_seq: int | None = None):
    """Attention of packed varlen queries over per-sequence page lists (plan_attention + AttentionPlan.run).

    q [total_q, Hq, D] (fp32/fp16/bf16; last dim contiguous); k_cache, v_cache [num_pages, page_size, Hkv, D]
    contiguous, same dtype; layout: PageLayout (sequence b's keys are, in order, the first token_counts[j] tokens
    of each page cols[j] of its row; rows are per sequence, or per (sequence, kv head) when row_offsets has
    B * Hkv + 1 entries); q_indptr [B + 1] int32.
    Positions are bottom-right aligned: with n_k keys and n_q queries, key i is at i and query i at n_k - n_q + i.
    causal: key visible iff key_pos <= query_pos; sliding_window w: also query_pos - key_pos < w.
    sm_scale defaults to D ** -0.5; Hq must be a multiple of Hkv.
    softcap: logit softcapping (Gemma 2/3): each scaled score s becomes softcap * tanh(s / softcap) before the
    softmax; None or 0: off. sinks [Hq] float32: attention sinks (GPT-OSS), a per-head logit that joins every row's
    softmax denominator and contributes no value (the returned lse includes it).
    max_q_len / max_pages_per_seq: optional bounds; not needed for speed (the plan finds them), checked if given.
    Calling it the same way many times (every layer of a model)? Plan once with `plan_attention` and call `run`.

    Returns out [total_q, Hq, D] in q's dtype, and lse [total_q, Hq] float32 (natural log) when return_lse.
    Rows with no visible key give zeros (lse -inf, or the sink logit with sinks).
    """
    if q.dim() != 3 or k_cache.dim() != 4:   # nothing to plan: the op's argument checks name the problem
        _ops.paged_attention(q, k_cache, v_cache, *layout[:3], q_indptr, causal, 1.0, 0, 0.0, sinks, [], None)
    plan = plan_attention(layout, q_indptr, num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2],
                          head_dim=q.shape[2], page_size=k_cache.shape[1], dtype=q.dtype, total_q=q.shape[0],
                          causal=causal, sm_scale=sm_scale, sliding_window=sliding_window, softcap=softcap,
                          max_q_len=max_q_len, max_pages_per_seq=max_pages_per_seq, allocate_workspace=False)
    return plan.run(q, k_cache, v_cache, layout, q_indptr, sinks=sinks, return_lse=return_lse)
