"""CUDA split-KV paged decode kernel (n_q <= 16 per sequence) against the float64 reference and SDPA.

Tolerance rule: the kernel's max error against float64 must be at most 2x the error of a plain PyTorch
implementation in the same low precision (plus a small absolute slack). Inputs are fresh random numbers every run,
pages are scattered by a permutation, outputs are checked for being written everywhere (NaN-poisoned memory).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flashcore_hf as fc
from tests.reference import reference_paged_attention

pytestmark = pytest.mark.gpu

DEV = "cuda"


# ---- helpers -------------------------------------------------------------------------------------------------

def make_layout(lengths, page_size, generator, *, partial_pages=False, extra_pages=3):
    """Scatter sequences over a permuted page pool. Returns (num_pages, row_offsets, cols, counts) on the CPU.

    partial_pages: pages anywhere in a list hold a random number of tokens (sparse page lists), not just the last.
    """
    cols_per_seq, counts_per_seq = [], []
    for n in lengths:
        counts = []
        left = n
        while left > 0:
            c = page_size if not partial_pages else int(torch.randint(1, page_size + 1, (1,), generator=generator))
            c = min(c, left)
            counts.append(c)
            left -= c
        counts_per_seq.append(counts)
    num_pages = sum(len(c) for c in counts_per_seq) + extra_pages
    perm = torch.randperm(num_pages, generator=generator)
    row_offsets, cols, counts, used = [0], [], [], 0
    for cs in counts_per_seq:
        for c in cs:
            cols.append(int(perm[used]))
            counts.append(c)
            used += 1
        row_offsets.append(len(cols))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return num_pages, i32(row_offsets), i32(cols), i32(counts)


def random_problem(lengths, n_qs, hq, hkv, d, page_size, dtype, generator, *, partial_pages=False, q_strided=False):
    num_pages, row_offsets, cols, counts = make_layout(lengths, page_size, generator, partial_pages=partial_pages)
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype).to(DEV)
    v_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype).to(DEV)
    total_q = sum(n_qs)
    if q_strided:  # heads not adjacent in memory: q is a slice of a wider tensor
        q = torch.randn(total_q, hq, 2 * d + 8, generator=generator).to(dtype).to(DEV)[:, :, 8:d + 8]
    else:
        q = torch.randn(total_q, hq, d, generator=generator).to(dtype).to(DEV)
    q_indptr = torch.tensor([0] + list(torch.tensor(n_qs).cumsum(0)), dtype=torch.int32)
    return q, k_cache, v_cache, row_offsets, cols, counts, q_indptr


def plan_for(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, *, causal=True, window=None,
             max_q_len=None, max_pages_per_seq=None, sm_scale=None, softcap=None, sinks=None):
    """The plan of a problem: exact bounds from the host metadata unless bounds are given (then trusted as they are:
    looser than the real values is allowed). sinks: a run argument, not part of the plan."""
    layout = fc.PageLayout(row_offsets.to(DEV), cols.to(DEV), counts.to(DEV), torch.full_like(cols, -1).to(DEV))
    n_q = (q_indptr[1:] - q_indptr[:-1])
    n_p = (row_offsets[1:] - row_offsets[:-1])
    if max_q_len is None:
        max_q_len = int(n_q.max()) if n_q.numel() else 0
    if max_pages_per_seq is None:
        max_pages_per_seq = int(n_p.max()) if n_p.numel() else 0
    plan = fc.plan_attention(layout, q_indptr.to(DEV), num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2],
                             head_dim=q.shape[2], page_size=k_cache.shape[1], dtype=q.dtype, total_q=q.shape[0],
                             causal=causal, sm_scale=sm_scale, sliding_window=window, softcap=softcap,
                             max_q_len=max_q_len, max_pages_per_seq=max_pages_per_seq, exact=True)
    return plan, layout


def run_kernel(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, *, causal=True, window=None,
               poison_workspace=False, max_q_len=None, max_pages_per_seq=None, sm_scale=None, softcap=None,
               sinks=None):
    plan, layout = plan_for(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, causal=causal, window=window,
                            max_q_len=max_q_len, max_pages_per_seq=max_pages_per_seq, sm_scale=sm_scale,
                            softcap=softcap)
    assert plan.kernel == "decode"
    if poison_workspace and plan.workspace is not None:   # the scratch part: the split counters stay the plan's
        plan.workspace[plan.split_counter_bytes // 4:].fill_(float("nan"))
    # Poison the blocks the caching allocator will hand out for out/lse: anything unwritten shows up as NaN.
    poison = (torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEV),
              torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=DEV))
    del poison
    out, lse = plan.run(q, k_cache, v_cache, layout, q_indptr.to(DEV), sinks=sinks, return_lse=True)
    torch.cuda.synchronize()
    return out, lse


def lowp_paged_attention(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, *, causal=True, window=None,
                         sm_scale=None, softcap=None, sinks=None):
    """Plain PyTorch attention computed in q's dtype on the GPU (the precision yardstick). softcap as in eager Gemma 2
    (tanh of the low-precision scores), sinks as in eager GPT-OSS (an extra softmax column, dropped afterwards)."""
    out = torch.zeros_like(q)
    hq, hkv, d = q.shape[1], k_cache.shape[2], q.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    for b in range(len(q_indptr) - 1):
        q0, q1 = int(q_indptr[b]), int(q_indptr[b + 1])
        p0, p1 = int(row_offsets[b]), int(row_offsets[b + 1])
        if q1 == q0 or p1 == p0:
            continue
        ks = torch.cat([k_cache[int(cols[j]), :int(counts[j])] for j in range(p0, p1)])
        vs = torch.cat([v_cache[int(cols[j]), :int(counts[j])] for j in range(p0, p1)])
        n_k, n_q = ks.shape[0], q1 - q0
        kr = ks.repeat_interleave(hq // hkv, dim=1)
        vr = vs.repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], kr) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(n_q, device=DEV) + n_k - n_q
        k_pos = torch.arange(n_k, device=DEV)
        visible = torch.ones(n_q, n_k, dtype=torch.bool, device=DEV)
        if causal:
            visible &= k_pos[None] <= q_pos[:, None]
        if window is not None:
            visible &= (q_pos[:, None] - k_pos[None]) < window
        scores = scores.masked_fill(~visible, -math.inf)
        if sinks is not None:
            sink_col = sinks.to(DEV, q.dtype)[:, None, None].expand(hq, n_q, 1)
            probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, vr)
    return out


def check_against_reference(out, lse, q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, *, causal=True,
                            window=None, sm_scale=None, softcap=None, sinks=None):
    options = dict(causal=causal, sliding_window=window, sm_scale=sm_scale, softcap=softcap)
    ref_out, ref_lse = reference_paged_attention(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr,
                                                 sinks=sinks, **options)
    lowp = lowp_paged_attention(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, causal=causal,
                                window=window, sm_scale=sm_scale, softcap=softcap, sinks=sinks)
    out64, lse64 = out.double().cpu(), lse.double().cpu()
    assert not torch.isnan(out64).any(), "NaN in out (an unwritten or poisoned element)"
    assert not torch.isnan(lse64).any(), "NaN in lse"
    err = (out64 - ref_out).abs().max().item() if out.numel() else 0.0
    lowp_err = (lowp.double().cpu() - ref_out).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * lowp_err + 1e-4, f"kernel error {err:.3e} vs plain {q.dtype} error {lowp_err:.3e}"
    # rows that see no key: lse -inf without sinks
    empty = torch.isinf(ref_lse if sinks is None else
                        reference_paged_attention(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr,
                                                  **options)[1])
    assert (out64[empty[..., None].expand_as(out64)] == 0).all(), "rows with no visible key must be zero"
    if sinks is None:
        assert torch.equal(torch.isinf(lse64), empty), "lse must be -inf exactly where a row sees no key"
    else:
        sink64 = sinks.double().cpu()[None, :].expand_as(lse64)
        assert torch.isfinite(lse64).all(), "with (finite) sinks every lse is finite"
        assert torch.allclose(lse64[empty], sink64[empty], rtol=1e-6, atol=1e-6), "rows with no key: lse = sink"
    seen = torch.isfinite(ref_lse)
    if seen.any():
        lse_err = (lse64[seen] - ref_lse[seen]).abs().max().item()
        assert lse_err <= 2e-3, f"lse error {lse_err:.3e}"
    return err, lowp_err


def check_each_kv_head(out, lse, q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, batch, *, sinks=None,
                       **options):
    """Per-(sequence, kv head) page lists (layout row b * Hkv + h): kv head h of every sequence must equal a
    per-sequence problem on that head's pages (its query heads, its sinks). options: as check_against_reference."""
    hkv = k_cache.shape[2]
    group = q.shape[1] // hkv
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    for h in range(hkv):
        sub_offsets, sub_cols, sub_counts = [0], [], []
        for r in [b * hkv + h for b in range(batch)]:
            sub_cols += cols[row_offsets[r]:row_offsets[r + 1]].tolist()
            sub_counts += counts[row_offsets[r]:row_offsets[r + 1]].tolist()
            sub_offsets.append(len(sub_cols))
        heads = slice(h * group, (h + 1) * group)
        check_against_reference(out[:, heads], lse[:, heads], q[:, heads].contiguous(),
                                k_cache[:, :, h:h + 1].contiguous(), v_cache[:, :, h:h + 1].contiguous(),
                                i32(sub_offsets), i32(sub_cols), i32(sub_counts), q_indptr,
                                sinks=None if sinks is None else sinks[heads], **options)


# ---- correctness over the support matrix ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [16, 32, 128, 256])
@pytest.mark.parametrize("group,n_q", [(1, 1), (4, 1), (8, 1), (4, 4), (8, 4), (1, 16), (4, 16), (8, 16)])
def test_decode_matches_reference(dtype, head_dim, page_size, group, n_q, generator):
    hkv = 2
    lengths = [int(x) for x in torch.randint(1, 1500, (3,), generator=generator)] + [n_q + 3]
    n_qs = [n_q] * len(lengths)
    prob = random_problem(lengths, n_qs, hkv * group, hkv, head_dim, page_size, dtype, generator)
    out, lse = run_kernel(*prob)
    check_against_reference(out, lse, *prob)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 7, 16, 48, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_sparse_partial_pages_and_odd_page_sizes(dtype, page_size, causal, generator):
    """Partial pages anywhere in the lists (sparse selections), page sizes that are not powers of two."""
    lengths = [int(x) for x in torch.randint(1, 700, (4,), generator=generator)]
    n_qs = [1, 3, 16, 5]
    prob = random_problem(lengths, n_qs, 16, 4, 128, page_size, dtype, generator, partial_pages=True)
    out, lse = run_kernel(*prob, causal=causal)
    check_against_reference(out, lse, *prob, causal=causal)


@pytest.mark.parametrize("window", [1, 7, 64, 300])
@pytest.mark.parametrize("n_q", [1, 4, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(window, n_q, causal, generator):
    lengths = [2000, 10, 513]
    prob = random_problem(lengths, [n_q] * 3, 32, 8, 128, 16, torch.bfloat16, generator, partial_pages=True)
    out, lse = run_kernel(*prob, causal=causal, window=window)
    check_against_reference(out, lse, *prob, causal=causal, window=window)


def test_empty_sequences(generator):
    """n_k = 0 with queries (zero rows, lse -inf), n_q = 0 with keys, n_q > n_k (causal: leading rows see nothing)."""
    lengths = [0, 300, 5, 0, 77]
    n_qs = [2, 0, 12, 0, 1]
    prob = random_problem(lengths, n_qs, 8, 2, 128, 16, torch.float16, generator)
    out, lse = run_kernel(*prob)
    check_against_reference(out, lse, *prob)
    assert torch.isinf(lse[:2]).all() and (out[:2] == 0).all()


def test_invalid_page_entries_are_empty(generator):
    """Page ids outside the pool and counts outside [0, page_size] are read as empty pages (never out of bounds)."""
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = random_problem(
        [400, 900], [1, 4], 16, 4, 128, 32, torch.bfloat16, generator, partial_pages=True)
    bad_cols, bad_counts = cols.clone(), counts.clone()
    bad_cols[1] = k_cache.shape[0] + 5
    bad_cols[3] = -1
    bad_counts[5] = 33
    bad_counts[7] = -2
    out, lse = run_kernel(q, k_cache, v_cache, row_offsets, bad_cols, bad_counts, q_indptr)
    clean_counts = counts.clone()
    clean_counts[[1, 3, 5, 7]] = 0
    check_against_reference(out, lse, q, k_cache, v_cache, row_offsets, cols, clean_counts, q_indptr)


def test_strided_q_and_nan_workspace(generator):
    """q with padded head stride; a NaN-filled plan workspace (its scratch part) must not leak into the output."""
    prob = random_problem([3000, 40], [4, 4], 32, 8, 128, 16, torch.bfloat16, generator, q_strided=True)
    out, lse = run_kernel(*prob, poison_workspace=True)
    check_against_reference(out, lse, *prob)


@pytest.mark.parametrize("n_q", [1, 4, 16])
def test_one_plan_many_runs_keeps_split_counters_zero(n_q, generator):
    """The last split of each row chunk merges the partials and resets its counter: one plan run many times over
    changing page lists (rows with no page, one split, many splits; their counts change from run to run) is right
    every time and leaves the counters at zero; the one-shot op (fresh scratch: a second kernel merges) agrees."""
    hq, hkv, d, page_size = 32, 8, 128, 16
    runs = ([6000, 0, 40, 2500], [17, 5999, 0, 16], [0, 0, 0, 1], [4000, 4000, 4000, 4000])
    layouts = [make_layout(lengths, page_size, generator, extra_pages=0) for lengths in runs]
    num_pages = max(layout[0] for layout in layouts)
    nnz = max(layout[2].numel() for layout in layouts)   # every run's cols padded to one length (the plan's)
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.bfloat16).to(DEV)
    v_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.bfloat16).to(DEV)
    q = torch.empty(4 * n_q, hq, d, dtype=torch.bfloat16, device=DEV)
    q_indptr = torch.arange(0, 4 * n_q + 1, n_q, dtype=torch.int32)
    plan = None
    for _, row_offsets, cols, counts in layouts:
        cols = torch.cat([cols, torch.zeros(nnz - cols.numel(), dtype=torch.int32)])
        counts = torch.cat([counts, torch.zeros(nnz - counts.numel(), dtype=torch.int32)])
        if plan is None:
            plan, _ = plan_for(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, max_q_len=n_q,
                               max_pages_per_seq=nnz)
            assert plan.splits > 1 and plan.split_counter_bytes > 0
        layout = fc.PageLayout(row_offsets.to(DEV), cols.to(DEV), counts.to(DEV), torch.full_like(cols, -1).to(DEV))
        q.copy_(torch.randn(q.shape, generator=generator).to(q.dtype))
        out, lse = plan.run(q, k_cache, v_cache, layout, q_indptr.to(DEV), return_lse=True)
        torch.cuda.synchronize()
        counters = plan.workspace[:plan.split_counter_bytes // 4].view(torch.int32)
        assert (counters == 0).all(), "split counters must be zero after a run"
        check_against_reference(out, lse, q, k_cache, v_cache, row_offsets, cols, counts, q_indptr)
        out, lse = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr.to(DEV), return_lse=True)
        check_against_reference(out, lse, q, k_cache, v_cache, row_offsets, cols, counts, q_indptr)


def test_large_batch_no_split(generator):
    """B = 256 fills the GPU: the kernel writes the output directly (no split partials)."""
    lengths = [int(x) for x in torch.randint(1, 1200, (256,), generator=generator)]
    prob = random_problem(lengths, [1] * 256, 32, 8, 128, 16, torch.bfloat16, generator, partial_pages=True)
    out, lse = run_kernel(*prob)
    check_against_reference(out, lse, *prob)


def test_loose_host_bounds(generator):
    """Plan bounds larger than the real values (what a CUDA-graph bucket or a shape-only plan uses) stay correct."""
    prob = random_problem([700, 1300, 0], [1, 2, 1], 16, 2, 64, 16, torch.float16, generator)
    out, lse = run_kernel(*prob, max_q_len=16, max_pages_per_seq=int(prob[4].numel()))
    check_against_reference(out, lse, *prob)


def test_cuda_graph_replay(generator):
    """Plan once, run inside a CUDA graph: allocation- and sync-free; replays on new data in place."""
    prob = random_problem([5000, 100], [1, 1], 32, 8, 128, 16, torch.bfloat16, generator)
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = prob
    plan, layout = plan_for(*prob)
    qi = q_indptr.to(DEV)
    plan.run(q, k_cache, v_cache, layout, qi)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = plan.run(q, k_cache, v_cache, layout, qi, return_lse=True)
    for _ in range(2):
        q.copy_(torch.randn(q.shape, generator=generator).to(q.dtype))
        graph.replay()
        torch.cuda.synchronize()
        check_against_reference(out, lse, q, k_cache, v_cache, row_offsets, cols, counts, q_indptr)


# ---- SDPA on dense copies as a second oracle ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_q", [1, 4, 16])
def test_matches_sdpa_dense(dtype, n_q, generator):
    batch, ctx, hq, hkv, d, page_size = 4, 4096 + 37, 32, 8, 128, 16
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = random_problem(
        [ctx] * batch, [n_q] * batch, hq, hkv, d, page_size, dtype, generator)
    out, lse = run_kernel(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr)
    # dense [B, H, S, D] copies of the same data
    k_dense = torch.stack([torch.cat([k_cache[int(cols[j]), :int(counts[j])]
                                      for j in range(int(row_offsets[b]), int(row_offsets[b + 1]))])
                           for b in range(batch)]).transpose(1, 2)
    v_dense = torch.stack([torch.cat([v_cache[int(cols[j]), :int(counts[j])]
                                      for j in range(int(row_offsets[b]), int(row_offsets[b + 1]))])
                           for b in range(batch)]).transpose(1, 2)
    q_dense = q.view(batch, n_q, hq, d).transpose(1, 2)
    mask = None
    if n_q > 1:  # bottom-right causal
        mask = (torch.arange(ctx, device=DEV)[None] <= torch.arange(n_q, device=DEV)[:, None] + ctx - n_q)
    sdpa = F.scaled_dot_product_attention(q_dense, k_dense, v_dense, attn_mask=mask, enable_gqa=True)
    sdpa = sdpa.transpose(1, 2).reshape(q.shape)
    # float64 truth on the GPU
    q64, k64, v64 = q_dense.double(), k_dense.double(), v_dense.double()
    k64, v64 = k64.repeat_interleave(hq // hkv, 1), v64.repeat_interleave(hq // hkv, 1)
    scores = q64 @ k64.transpose(-1, -2) * d ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    ref = (torch.softmax(scores, -1) @ v64).transpose(1, 2).reshape(q.shape)
    err = (out.double() - ref).abs().max().item()
    sdpa_err = (sdpa.double() - ref).abs().max().item()
    assert err <= 2 * sdpa_err + 1e-3, f"kernel {err:.3e} vs SDPA {sdpa_err:.3e}"
    assert (out.float() - sdpa.float()).abs().max().item() <= 2 * sdpa_err + 2e-3


def test_long_context_128k(generator):
    """B = 1 at 128K keys (the split-KV path at its widest), checked against float64 on the GPU."""
    ctx, hq, hkv, d, page_size = 131072, 32, 8, 128, 16
    num_pages = ctx // page_size + 5
    gpu_gen = torch.Generator(device=DEV).manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    k_cache = torch.randn(num_pages, page_size, hkv, d, device=DEV, generator=gpu_gen, dtype=torch.bfloat16)
    v_cache = torch.randn(num_pages, page_size, hkv, d, device=DEV, generator=gpu_gen, dtype=torch.bfloat16)
    cols = torch.randperm(num_pages, generator=generator)[:ctx // page_size].to(torch.int32)
    counts = torch.full_like(cols, page_size)
    row_offsets = torch.tensor([0, cols.numel()], dtype=torch.int32)
    for n_q in (1, 4):
        q = torch.randn(n_q, hq, d, device=DEV, generator=gpu_gen, dtype=torch.bfloat16)
        q_indptr = torch.tensor([0, n_q], dtype=torch.int32)
        out, lse = run_kernel(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr)
        k = k_cache[cols.to(DEV)].reshape(-1, hkv, d).double().repeat_interleave(hq // hkv, 1)
        v = v_cache[cols.to(DEV)].reshape(-1, hkv, d).double().repeat_interleave(hq // hkv, 1)
        scores = torch.einsum("qhd,khd->hqk", q.double(), k) * d ** -0.5
        visible = torch.arange(ctx, device=DEV)[None] <= torch.arange(n_q, device=DEV)[:, None] + ctx - n_q
        scores = scores.masked_fill(~visible, -math.inf)
        ref_lse = torch.logsumexp(scores, -1)
        ref = torch.einsum("hqk,khd->qhd", torch.exp(scores - ref_lse[..., None]), v)
        # yardstick: SDPA on the dense bf16 copy
        kd = k_cache[cols.to(DEV)].reshape(1, -1, hkv, d).transpose(1, 2)
        vd = v_cache[cols.to(DEV)].reshape(1, -1, hkv, d).transpose(1, 2)
        sdpa = F.scaled_dot_product_attention(q.view(1, n_q, hq, d).transpose(1, 2), kd, vd,
                                              attn_mask=visible if n_q > 1 else None, enable_gqa=True)
        sdpa = sdpa.transpose(1, 2).reshape(q.shape)
        rel = lambda x: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        err, sdpa_err = rel(out), rel(sdpa)
        assert err <= 2 * sdpa_err + 1e-4, f"n_q={n_q}: relative error {err:.3e} vs SDPA {sdpa_err:.3e}"
        assert (lse.double() - ref_lse.transpose(0, 1)).abs().max().item() <= 2e-3


@pytest.mark.parametrize("n_q,causal,window", [(1, True, None), (4, True, None), (4, False, None), (3, True, 40)])
def test_per_kv_head_page_lists(n_q, causal, window, generator):
    """row_offsets with B * Hkv + 1 entries (sparse per-head selection): each kv head reads its own page list.

    Checked head by head: kv head h of every sequence must equal a per-sequence problem on that head's pages.
    """
    batch, hkv, group, d, page_size = 3, 4, 4, 128, 16
    lengths = [int(x) for x in torch.randint(0, 900, (batch * hkv,), generator=generator)]
    num_pages, row_offsets, cols, counts = make_layout(lengths, page_size, generator, partial_pages=True)
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.bfloat16).to(DEV)
    v_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.bfloat16).to(DEV)
    q = torch.randn(batch * n_q, hkv * group, d, generator=generator).to(torch.bfloat16).to(DEV)
    q_indptr = torch.arange(batch + 1, dtype=torch.int32) * n_q
    out, lse = run_kernel(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, causal=causal, window=window)
    check_each_kv_head(out, lse, q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, batch, causal=causal,
                       window=window)


# ---- logit softcapping and attention sinks ---------------------------------------------------------------------
# Large scores (sm_scale = 3 / sqrt(D)) so that softcap 5 bites hard and 50 a little; sinks are random logits of
# scale 3 with head 0's at +20 (it dominates its rows: outputs near zero, lse near 20) and head 1's at -20 (no effect).

SOFTCAP_SINKS = [(5.0, False), (50.0, True), (None, True)]


def random_sinks(hq, generator):
    sinks = 3 * torch.randn(hq, generator=generator)
    sinks[0], sinks[1] = 20.0, -20.0
    return sinks.to(DEV)


def splits_page_lists(prob, **kwargs):
    """True when the decode kernel's plan splits this call's page lists (partials merged by the merge kernel)."""
    return plan_for(*prob, **kwargs)[0].splits > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("softcap,with_sinks", SOFTCAP_SINKS)
def test_softcap_and_sinks(dtype, head_dim, softcap, with_sinks, generator):
    """Split page lists (long contexts, small batch: the sink joins in the merge kernel) and unsplit ones (short
    contexts: the sink joins in the main kernel); rows that see no key (n_k = 0, n_q > n_k); GQA 4, odd sizes."""
    hkv, group = 2, 4
    hq = hkv * group
    opts = dict(sm_scale=3.0 * head_dim ** -0.5, softcap=softcap,
                sinks=random_sinks(hq, generator) if with_sinks else None)
    long_lengths = [int(x) for x in torch.randint(2000, 4000, (2,), generator=generator)] + [1, 0]
    prob = random_problem(long_lengths, [1] * 4, hq, hkv, head_dim, 16, dtype, generator)
    assert splits_page_lists(prob, **opts), "expected the split-KV path"
    out, lse = run_kernel(*prob, **opts)
    check_against_reference(out, lse, *prob, **opts)

    # At most 8 full pages (two key tiles or less): one split. n_q 12 over 5 keys: the first 7 queries see nothing.
    short_lengths = [120, 5, 0, 77]
    assert not splits_page_lists(random_problem(short_lengths, [1] * 4, hq, hkv, head_dim, 16, dtype, generator),
                                 **opts), "expected a single split"
    prob = random_problem(short_lengths, [16, 12, 2, 1], hq, hkv, head_dim, 16, dtype, generator)
    out, lse = run_kernel(*prob, **opts)
    check_against_reference(out, lse, *prob, **opts)


@pytest.mark.parametrize("window,n_q", [(7, 1), (300, 16), (64, 4)])
def test_softcap_and_sinks_with_window(window, n_q, generator):
    """Sliding windows: whole splits fall outside the window (partial lse -inf next to a finite sink)."""
    hq, hkv, d = 32, 8, 128
    opts = dict(sm_scale=3.0 * d ** -0.5, softcap=30.0, sinks=random_sinks(hq, generator))
    prob = random_problem([2000, 10, 513], [n_q] * 3, hq, hkv, d, 16, torch.bfloat16, generator, partial_pages=True)
    out, lse = run_kernel(*prob, window=window, **opts)
    check_against_reference(out, lse, *prob, window=window, **opts)


def test_softcap_and_sinks_large_batch_no_split(generator):
    """B = 256 fills the GPU: no split, the sink joins in the main kernel at every context length."""
    lengths = [int(x) for x in torch.randint(0, 1200, (256,), generator=generator)]
    hq = 32
    opts = dict(sm_scale=3.0 * 128 ** -0.5, softcap=20.0, sinks=random_sinks(hq, generator))
    prob = random_problem(lengths, [1] * 256, hq, 8, 128, 16, torch.bfloat16, generator, partial_pages=True)
    assert not splits_page_lists(prob, **opts)
    out, lse = run_kernel(*prob, **opts)
    check_against_reference(out, lse, *prob, **opts)


# ---- the K/V ring's depth (decode.cu: make_decode_plan) ------------------------------------------------
# One query of a group of at most 16 heads per sequence (one m-tile per block) takes a ring of 2 tiles (3 blocks per
# SM) when no row has more keys than one tile, else of 3 (2 blocks per SM), as every other call does.

def tile_keys(head_dim):
    return 8192 // head_dim


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("softcap,with_sinks", [(None, False)] + SOFTCAP_SINKS)
@pytest.mark.parametrize("page_size", [16, "tile"])
def test_short_rows_two_stage_ring(dtype, head_dim, softcap, with_sinks, page_size, generator):
    """600 sequences x 8 kv heads of at most one tile of keys each (a cascade's suffixes): several waves of the
    two-stage ring; rows of 0 keys, of a full tile, and (page_size "tile") partly filled single pages."""
    tile = tile_keys(head_dim)
    page = tile if page_size == "tile" else page_size
    hq, hkv, batch = 32, 8, 600
    lengths = [int(x) for x in torch.randint(1, tile + 1, (batch,), generator=generator)]
    lengths[:3] = [tile, 0, 1]
    opts = dict(sm_scale=3.0 * head_dim ** -0.5, softcap=softcap,
                sinks=random_sinks(hq, generator) if with_sinks else None)
    prob = random_problem(lengths, [1] * batch, hq, hkv, head_dim, page, dtype, generator)
    assert int((prob[3][1:] - prob[3][:-1]).max()) * page <= tile, "every row within one tile"
    out, lse = run_kernel(*prob, **opts)
    check_against_reference(out, lse, *prob, **opts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("softcap,with_sinks", [(None, False)] + SOFTCAP_SINKS)
def test_sparse_step_shape(dtype, head_dim, softcap, with_sinks, generator):
    """A sparse decode step's shape: 1 sequence x 8 kv heads, each with its own list of 64 scattered pages of 64
    (partly filled), split 16 ways: 128 blocks of 4 pages, the last of each head merging the 16 partials."""
    hq, hkv, page, pages_per_row = 32, 8, 64, 64
    num_pages = hkv * pages_per_row + 3
    cols = torch.randperm(num_pages, generator=generator)[:hkv * pages_per_row].to(torch.int32)
    counts = torch.randint(1, page + 1, (hkv * pages_per_row,), generator=generator, dtype=torch.int32)
    row_offsets = torch.arange(hkv + 1, dtype=torch.int32) * pages_per_row
    k_cache = torch.randn(num_pages, page, hkv, head_dim, generator=generator).to(dtype).to(DEV)
    v_cache = torch.randn(num_pages, page, hkv, head_dim, generator=generator).to(dtype).to(DEV)
    q = torch.randn(1, hq, head_dim, generator=generator).to(dtype).to(DEV)
    q_indptr = torch.tensor([0, 1], dtype=torch.int32)
    opts = dict(sm_scale=3.0 * head_dim ** -0.5, softcap=softcap,
                sinks=random_sinks(hq, generator) if with_sinks else None)
    out, lse = run_kernel(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, **opts)
    check_each_kv_head(out, lse, q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, 1, **opts)


def test_sinks_at_minus_inf_change_nothing(generator):
    """A sink of -inf adds exp(-inf) = 0: bit for bit the result without sinks, split (merge kernel) or not."""
    hq = 16
    sinks = torch.full((hq,), -math.inf, device=DEV)
    for lengths in ([3000, 2500], [100, 60]):
        prob = random_problem(lengths, [1, 1], hq, 4, 128, 16, torch.bfloat16, generator)
        out, lse = run_kernel(*prob, softcap=10.0)
        out_s, lse_s = run_kernel(*prob, softcap=10.0, sinks=sinks)
        assert torch.equal(out, out_s) and torch.equal(lse, lse_s)


@pytest.mark.parametrize("n_q,causal,window", [(1, True, None), (3, True, 40)])
def test_softcap_and_sinks_per_kv_head_page_lists(n_q, causal, window, generator):
    """Per-(sequence, kv head) page lists: each kv head's query heads use their own sinks."""
    batch, hkv, group, d, page_size = 3, 4, 4, 64, 16
    lengths = [int(x) for x in torch.randint(0, 3000, (batch * hkv,), generator=generator)]
    num_pages, row_offsets, cols, counts = make_layout(lengths, page_size, generator, partial_pages=True)
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.float16).to(DEV)
    v_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.float16).to(DEV)
    q = torch.randn(batch * n_q, hkv * group, d, generator=generator).to(torch.float16).to(DEV)
    q_indptr = torch.arange(batch + 1, dtype=torch.int32) * n_q
    sinks = random_sinks(hkv * group, generator)
    opts = dict(sm_scale=3.0 * d ** -0.5, softcap=5.0)
    out, lse = run_kernel(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, causal=causal, window=window,
                          sinks=sinks, **opts)
    check_each_kv_head(out, lse, q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, batch, causal=causal,
                       window=window, sinks=sinks, **opts)


# ---- the public op without hints, and plans ---------------------------------------------------------------------

@pytest.mark.parametrize("batch, context, page_size", [(1, 8192, 128), (16, 2048, 16), (64, 1024, 128)])
def test_public_op_without_hints_plans_decode(batch, context, page_size, generator):
    """The README call (device metadata, no hints): the decode kernel, no host sync (shape-only bounds), correct."""
    prob = random_problem([context] * batch, [1] * batch, 32, 8, 128, page_size, torch.bfloat16, generator)
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = prob
    layout = fc.PageLayout(row_offsets.to(DEV), cols.to(DEV), counts.to(DEV), torch.full_like(cols, -1).to(DEV))
    plan = fc.plan_attention(layout, q_indptr.to(DEV), num_q_heads=32, num_kv_heads=8, head_dim=128,
                             page_size=page_size, dtype=q.dtype, total_q=q.shape[0])
    assert plan.kernel == "decode"                       # B = 64 too: never the prefill kernel for a decode batch
    out, lse = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr.to(DEV), return_lse=True)
    torch.cuda.synchronize()
    check_against_reference(out, lse, *prob)


def test_too_small_hints_raise_on_cuda(generator):
    prob = random_problem([700, 1300], [1, 3], 16, 2, 64, 16, torch.float16, generator)
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = prob
    layout = fc.PageLayout(row_offsets.to(DEV), cols.to(DEV), counts.to(DEV), torch.full_like(cols, -1).to(DEV))
    with pytest.raises(RuntimeError, match="max_pages_per_seq = 10 but layout row 0 reads 44 pages"):
        fc.paged_attention(q, k_cache, v_cache, layout, q_indptr.to(DEV), max_pages_per_seq=10)
    with pytest.raises(RuntimeError, match="max_q_len = 2 but sequence 1 has 3 queries"):
        fc.paged_attention(q, k_cache, v_cache, layout, q_indptr.to(DEV), max_q_len=2)
    out, lse = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr.to(DEV), max_q_len=3, return_lse=True,
                                  max_pages_per_seq=82)
    torch.cuda.synchronize()
    check_against_reference(out, lse, *prob)


def test_plan_shape_mismatch_is_refused(generator):
    prob = random_problem([700, 130], [1, 1], 16, 2, 64, 16, torch.float16, generator)
    plan, layout = plan_for(*prob)
    other = random_problem([700, 130, 5], [1, 1, 1], 16, 2, 64, 16, torch.float16, generator)
    other_layout = fc.PageLayout(*(t.to(DEV) for t in other[3:6]), torch.full_like(other[4], -1).to(DEV))
    with pytest.raises(RuntimeError, match="the plan was made for batch"):
        plan.run(other[0], other[1], other[2], other_layout, other[6].to(DEV))
