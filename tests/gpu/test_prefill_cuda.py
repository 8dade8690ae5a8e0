"""CUDA prefill kernel (max_q_len > 16) against float64 references on fresh random inputs.

Accuracy rule: the kernel's largest error against float64 must stay within 2x the error of a plain low-precision
torch implementation (matmuls in the input dtype, softmax in float32: what eager attention does) plus a small atol.
Outputs come from an allocator primed with NaN-filled blocks of the same sizes, so an element the kernel forgets to
write shows up as NaN.

Every test runs once per prefill kernel, chosen through FLASHCORE_PREFILL_KERNEL: "wgmma" (the Hopper kernel where it
applies: head dim 128 on an sm_90 device; the mma.sync kernel elsewhere) and "mma" (the mma.sync kernel everywhere).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import flashcore_hf as fc
from tests.reference import random_paged_kv, reference_paged_attention

pytestmark = pytest.mark.gpu

ATOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}


@pytest.fixture(autouse=True, params=["wgmma", "mma"])
def prefill_kernel(request, monkeypatch):
    """Runs the test under each prefill kernel (the dispatcher reads the variable at every call)."""
    monkeypatch.setenv("FLASHCORE_PREFILL_KERNEL", request.param)
    return request.param


def _wgmma_applies():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


# ---- helpers -----------------------------------------------------------------------------------------------------

def _layout(row_offsets, cols, counts):
    return fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))


def _q_indptr(q_lens, device="cuda"):
    return torch.tensor([0, *torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def _poison(*like):
    """Leave NaN-filled blocks of these sizes in the caching allocator, so fresh outputs start as NaN."""
    blocks = [torch.full(t.shape, math.nan, dtype=t.dtype, device="cuda") for t in like]
    del blocks


def _sequence_slots(row_offsets, cols, counts, page_size, num_pages, b):
    """Token slots (page * page_size + offset) of sequence b's keys in order; invalid entries count as empty."""
    slots = []
    for j in range(int(row_offsets[b]), int(row_offsets[b + 1])):
        page, count = int(cols[j]), int(counts[j])
        if 0 <= page < num_pages and 0 <= count <= page_size:
            slots.extend(range(page * page_size, page * page_size + count))
    return torch.tensor(slots, dtype=torch.int64, device="cuda")


def dense_attention(q, k, v, *, causal, window, scale, lowp, softcap=None, sinks=None):
    """One sequence on the GPU. q [n_q, Hq, D]; k, v [n_k, Hkv, D] -> out [n_q, Hq, D] float64, lse [n_q, Hq].

    lowp=False: float64 throughout (the reference). lowp=True: matmuls in the input dtype, softmax in float32,
    probabilities cast back to the input dtype (the plain low-precision implementation the kernel is judged against).
    softcap: scores s -> softcap * tanh(s / softcap); sinks [Hq] float32: one more logit per head in the softmax
    denominator (no value), included in lse.
    """
    n_q, hq, d = q.shape
    n_k, hkv = k.shape[0], k.shape[1]
    if n_k == 0:
        lse = torch.full((n_q, hq), -math.inf, dtype=torch.float64, device=q.device)
        if sinks is not None:
            lse[:] = sinks.double()
        return torch.zeros(n_q, hq, d, dtype=torch.float64, device=q.device), lse
    k = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)      # [Hq, n_k, D]
    v = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    qh = q.transpose(0, 1)                                         # [Hq, n_q, D]
    if lowp:
        scores = (qh @ k.transpose(1, 2)).float() * scale
    else:
        scores = (qh.double() @ k.double().transpose(1, 2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(n_q, device=q.device) + (n_k - n_q)
    k_pos = torch.arange(n_k, device=q.device)
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if causal:
        visible &= k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        visible &= (q_pos[:, None] - k_pos[None, :]) < window
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)                          # [Hq, n_q]
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.to(scores.dtype)[:, None])
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]), nan=0.0)
    if lowp:
        out = (probs.to(q.dtype) @ v).double()
    else:
        out = probs @ v.double()
    return out.transpose(0, 1), lse.transpose(0, 1).double()


def batch_reference(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, *, causal, window, scale, lowp,
                    softcap=None, sinks=None):
    ro, cl, ct, qi = (t.cpu() for t in (row_offsets, cols, counts, q_indptr))
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    k_flat = k_cache.reshape(-1, *k_cache.shape[2:])
    v_flat = v_cache.reshape(-1, *v_cache.shape[2:])
    out = torch.zeros(q.shape, dtype=torch.float64, device="cuda")
    lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64, device="cuda")
    for b in range(len(qi) - 1):
        q0, q1 = int(qi[b]), int(qi[b + 1])
        if q1 == q0:
            continue
        slots = _sequence_slots(ro, cl, ct, page_size, num_pages, b)
        out[q0:q1], lse[q0:q1] = dense_attention(q[q0:q1], k_flat[slots], v_flat[slots], causal=causal,
                                                 window=window, scale=scale, lowp=lowp, softcap=softcap,
                                                 sinks=sinks)
    return out, lse


def check_case(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, *, causal=True, window=None, scale=None,
               max_q_len=None, max_pages_per_seq=None, softcap=None, sinks=None):
    """Run the op and check it against float64 under the 2x-low-precision rule; returns (out, lse)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    _poison(q, q[..., 0].float())
    layout = _layout(row_offsets, cols, counts)
    if max_q_len is None and max_pages_per_seq is None:   # the public op as the README calls it
        out, lse = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr, causal=causal, sm_scale=scale,
                                      sliding_window=window, softcap=softcap, sinks=sinks, return_lse=True)
    else:                                                 # a plan with these (looser) bounds, trusted as given
        plan = fc.plan_attention(layout, q_indptr, num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2],
                                 head_dim=q.shape[2], page_size=k_cache.shape[1], dtype=q.dtype, total_q=q.shape[0],
                                 causal=causal, sm_scale=scale, sliding_window=window, softcap=softcap,
                                 max_q_len=max_q_len, max_pages_per_seq=max_pages_per_seq, exact=True)
        assert plan.kernel.startswith("prefill") or max_q_len <= 16
        out, lse = plan.run(q, k_cache, v_cache, layout, q_indptr, sinks=sinks, return_lse=True)
    torch.cuda.synchronize()
    options = dict(causal=causal, window=window, scale=scale, softcap=softcap)
    ref, ref_lse = batch_reference(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, lowp=False,
                                   sinks=sinks, **options)
    low, _ = batch_reference(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, lowp=True, sinks=sinks,
                             **options)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:2]
    assert torch.isfinite(out).all(), "NaN/inf in the output (an unwritten or poisoned element)"
    kernel_err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    lowp_err = (low - ref).abs().max().item() if out.numel() else 0.0
    assert kernel_err <= 2 * lowp_err + ATOL[q.dtype], f"kernel err {kernel_err:.3g} vs torch lowp {lowp_err:.3g}"
    # queries that see a key (without sinks: exactly where lse is finite)
    seen = torch.isfinite(ref_lse if sinks is None else
                          batch_reference(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, lowp=False,
                                          **options)[1])
    assert torch.all(out[~seen] == 0)
    if sinks is None:
        assert torch.equal(torch.isfinite(lse), seen), "lse must be -inf exactly where a query sees no key"
        assert torch.all(lse[~seen] == -math.inf)
        torch.testing.assert_close(lse.double()[seen], ref_lse[seen], atol=2e-3, rtol=1e-4)
    else:
        sink = sinks.double()[None, :].expand(lse.shape)
        assert torch.isfinite(lse).all(), "with (finite) sinks every lse is finite"
        torch.testing.assert_close(lse.double()[~seen], sink[~seen], atol=1e-6, rtol=1e-6)  # no key: lse = sink
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=1e-4)
    return out, lse


def make_batch(generator, n_k, n_q, *, page_size, hkv, group, head_dim, dtype):
    k_cache, v_cache, row_offsets, cols, counts = random_paged_kv(n_k, page_size, hkv, head_dim, dtype=dtype,
                                                                  device="cuda", generator=generator)
    q = torch.randn(sum(n_q), hkv * group, head_dim, generator=generator).to(dtype).cuda()
    return q, k_cache, v_cache, row_offsets, cols, counts, _q_indptr(n_q)


# (n_q, n_k) per sequence: full prompts with odd lengths, chunked prefill (n_q < n_k), single-query rows,
# an empty sequence, queries without keys.
MIXED = [(97, 97), (1000, 1000), (0, 37), (1, 300), (50, 700), (20, 0), (130, 130), (17, 4)]


# ---- tests -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_size", [16, 64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_mixed_batch_matches_float64(generator, dtype, head_dim, page_size, group):
    n_q, n_k = zip(*MIXED)
    case = make_batch(generator, list(n_k), list(n_q), page_size=page_size, hkv=2, group=group, head_dim=head_dim,
                      dtype=dtype)
    check_case(*case)


@pytest.mark.parametrize("page_size", [1, 24])
def test_odd_page_sizes(generator, page_size):
    """Page size 1 (a 64-key tile spans several 32-page windows) and a non-power-of-two size (binary search)."""
    n_q, n_k = zip(*MIXED)
    case = make_batch(generator, list(n_k), list(n_q), page_size=page_size, hkv=2, group=4, head_dim=128,
                      dtype=torch.bfloat16)
    check_case(*case)
    check_case(*case, causal=False, window=300)


@pytest.mark.parametrize("group", [2, 3, 5, 6, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_group_sizes_not_a_power_of_two(generator, group, head_dim):
    """Query groups of 2-7 heads per kv head (Qwen-style 7 among them): the split of a packed (query, head) row into
    its query and head (a division by the group size), with sinks to read the head of every row."""
    n_q, n_k = zip(*MIXED)
    case = make_batch(generator, list(n_k), list(n_q), page_size=64, hkv=2, group=group, head_dim=head_dim,
                      dtype=torch.bfloat16)
    check_case(*case)
    check_case(*case, sinks=random_sinks(2 * group, generator))


@pytest.mark.parametrize("ramp", ["rising", "falling"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_scores_rising_or_falling_along_the_keys(generator, ramp, dtype, head_dim):
    """The running row max: each key scaled by a ramp over its position, so that a row's max grows by far more than
    2^8 from one key tile to the next (rising: the sums and O rescaled tile after tile, the last keys dominating) or
    stops growing after the first tile (falling: the first tile's max kept to the end, later weights tiny). Growth
    between 1 and 2^8 (weights above 1 under a kept max) happens in every case here at scale 3 / sqrt(D)."""
    n_q, n_k = zip(*MIXED)
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = make_batch(
        generator, list(n_k), list(n_q), page_size=64, hkv=2, group=4, head_dim=head_dim, dtype=dtype)
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    for b in range(len(n_k)):
        slots = _sequence_slots(row_offsets.cpu(), cols.cpu(), counts.cpu(), k_cache.shape[1], k_cache.shape[0], b)
        position = torch.arange(len(slots), device="cuda", dtype=torch.float32)
        factor = 1 + position / 64 if ramp == "rising" else 16 / (1 + position / 64)
        k_flat[slots] = (k_flat[slots].float() * factor[:, None, None]).to(dtype)
    check_case(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, scale=3.0 * head_dim ** -0.5)


@pytest.mark.parametrize("page_size", [8, 32, 128, 512])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_unused_slots_are_never_read(generator, page_size, head_dim):
    """Slots past a page's token count and pages outside the layout hold NaN, so reading one shows in the output.
    On Hopper, tiles of 128 keys on full pages load by TMA in boxes of min(page_size, 128) rows (8 and 32: many
    boxes per tile, 512: a tile inside a page) and the tile holding a partial page is gathered by cp.async."""
    n_q, n_k = zip(*MIXED)
    case = make_batch(generator, list(n_k), list(n_q), page_size=page_size, hkv=2, group=4, head_dim=head_dim,
                      dtype=torch.bfloat16)
    _, k_cache, v_cache, _, cols, counts, _ = case
    unused = torch.ones(k_cache.shape[:2], dtype=torch.bool, device="cuda")
    for page, count in zip(cols.tolist(), counts.tolist()):
        unused[page, :count] = False
    k_cache[unused] = math.nan
    v_cache[unused] = math.nan
    check_case(*case)
    check_case(*case, window=300)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 100, 1000])
def test_causal_and_sliding_window(generator, dtype, causal, window):
    n_q, n_k = zip(*MIXED)
    case = make_batch(generator, list(n_k), list(n_q), page_size=64, hkv=2, group=4, head_dim=128, dtype=dtype)
    check_case(*case, causal=causal, window=window)


@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("dtype,head_dim,group", [(torch.bfloat16, 128, 4), (torch.float16, 64, 1)])
def test_long_sequences(generator, page_size, dtype, head_dim, group):
    # 4097 keys, once as a full prompt and once as a 1000-query chunk after 3097 cached keys
    case = make_batch(generator, [4097, 4097], [4097, 1000], page_size=page_size, hkv=2, group=group,
                      head_dim=head_dim, dtype=dtype)
    check_case(*case)
    check_case(*case, window=777)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_partial_pages_anywhere_and_bad_entries(generator, head_dim):
    """Random counts per page (zeros included) in any order; out-of-range page ids or counts act as empty pages."""
    page_size, hkv, group, dtype = 32, 2, 4, torch.float16
    num_pages = 300
    k_cache = torch.randn(num_pages, page_size, hkv, head_dim, generator=generator).to(dtype).cuda()
    v_cache = torch.randn(num_pages, page_size, hkv, head_dim, generator=generator).to(dtype).cuda()
    perm = torch.randperm(num_pages, generator=generator).tolist()
    row_offsets, cols, counts = [0], [], []
    n_q = [200, 65, 1, 0, 40]
    for pages in (60, 9, 4, 3, 70):
        for _ in range(pages):
            roll = int(torch.randint(0, 10, (1,), generator=generator))
            if roll == 0:      # page id out of range
                cols.append(num_pages + 7 if len(cols) % 2 else -3)
                counts.append(int(torch.randint(0, page_size + 1, (1,), generator=generator)))
            elif roll == 1:    # count out of range
                cols.append(perm.pop())
                counts.append(page_size + 1 if len(cols) % 2 else -1)
            else:
                cols.append(perm.pop())
                counts.append(int(torch.randint(0, page_size + 1, (1,), generator=generator)))
        row_offsets.append(len(cols))
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    q = torch.randn(sum(n_q), hkv * group, head_dim, generator=generator).to(dtype).cuda()
    for causal in (True, False):
        check_case(q, k_cache, v_cache, as_i32(row_offsets), as_i32(cols), as_i32(counts), _q_indptr(n_q),
                   causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_cpu_float64_reference(generator, dtype):
    """Ties the GPU reference used above to tests/reference.py (the project's float64 reference)."""
    n_q, n_k = [33, 1, 0, 64, 5], [100, 17, 9, 64, 0]
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = make_batch(
        generator, n_k, n_q, page_size=16, hkv=2, group=4, head_dim=64, dtype=dtype)
    out, lse = fc.paged_attention(q, k_cache, v_cache, _layout(row_offsets, cols, counts), q_indptr, return_lse=True)
    ref, ref_lse = reference_paged_attention(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2 * ATOL[dtype] + 4e-3, rtol=1e-2)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), seen)
    torch.testing.assert_close(lse.double().cpu()[seen], ref_lse[seen], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_sdpa_on_dense_copy(generator, causal):
    """Contiguous pages of equal-length sequences against SDPA on the dense [B, H, S, D] copy."""
    B, S, hkv, group, D, page_size, dtype = 3, 777, 2, 4, 128, 128, torch.bfloat16
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = make_batch(
        generator, [S] * B, [S] * B, page_size=page_size, hkv=hkv, group=group, head_dim=D, dtype=dtype)
    out = fc.paged_attention(q, k_cache, v_cache, _layout(row_offsets, cols, counts), q_indptr, causal=causal)
    k_flat, v_flat = k_cache.reshape(-1, hkv, D), v_cache.reshape(-1, hkv, D)
    slots = [_sequence_slots(row_offsets.cpu(), cols.cpu(), counts.cpu(), page_size, k_cache.shape[0], b)
             for b in range(B)]
    kd = torch.stack([k_flat[s] for s in slots]).transpose(1, 2).repeat_interleave(group, 1)   # [B, Hq, S, D]
    vd = torch.stack([v_flat[s] for s in slots]).transpose(1, 2).repeat_interleave(group, 1)
    qd = q.view(B, S, hkv * group, D).transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal).transpose(1, 2).reshape(q.shape)
    ref = F.scaled_dot_product_attention(qd.double(), kd.double(), vd.double(), is_causal=causal)
    ref = ref.transpose(1, 2).reshape(q.shape)
    kernel_err = (out.double() - ref).abs().max().item()
    sdpa_err = (sdpa.double() - ref).abs().max().item()
    assert kernel_err <= 2 * sdpa_err + ATOL[dtype], f"kernel err {kernel_err:.3g} vs SDPA {sdpa_err:.3g}"


def test_strided_q_and_custom_scale(generator):
    """q as a head slice of a fused qkv projection (token stride != Hq * D)."""
    hkv, group, D, dtype = 2, 4, 128, torch.bfloat16
    n_q = [300, 45]
    _, k_cache, v_cache, row_offsets, cols, counts, q_indptr = make_batch(
        generator, [300, 500], n_q, page_size=16, hkv=hkv, group=group, head_dim=D, dtype=dtype)
    qkv = torch.randn(sum(n_q), hkv * group + 2 * hkv, D, generator=generator).to(dtype).cuda()
    q = qkv[:, : hkv * group]
    assert not q.is_contiguous()
    check_case(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, scale=0.05)


def test_short_query_runs_on_the_prefill_path(generator):
    """A plan bound max_q_len > 16 routes to the prefill kernel even when every real run is short (n_q = 1, 0, 5,
    16)."""
    n_q, n_k = [1, 0, 5, 16], [40, 3, 5, 1000]
    case = make_batch(generator, n_k, n_q, page_size=16, hkv=2, group=8, head_dim=64, dtype=torch.float16)
    check_case(*case, max_q_len=64, max_pages_per_seq=200)
    check_case(*case, causal=False, max_q_len=17, max_pages_per_seq=63)


def test_cuda_graph_replay(generator):
    """No host sync and no allocation inside the op's launch: capture it in a CUDA graph and replay on new data."""
    n_q, n_k = [300, 40], [300, 900]
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = make_batch(
        generator, n_k, n_q, page_size=64, hkv=2, group=4, head_dim=128, dtype=torch.bfloat16)
    layout = _layout(row_offsets, cols, counts)
    plan = fc.plan_attention(layout, q_indptr, num_q_heads=8, num_kv_heads=2, head_dim=128, page_size=64,
                             dtype=q.dtype, total_q=q.shape[0])          # plan once (host copy of the offsets)
    assert plan.kernel.startswith("prefill") and (plan.max_q_len, plan.max_pages_per_seq) == (300, 15)
    call = lambda: plan.run(q, k_cache, v_cache, layout, q_indptr)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = call()
    q.copy_(torch.randn(q.shape, generator=generator).to(q.dtype))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_out, call(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size,group", [(16, 8), (64, 1), (128, 4), (256, 8), (48, 4)])
def test_many_tiles_ragged(generator, dtype, page_size, group):
    """Several 128-key tiles per CTA with ragged ends: odd lengths (1, 97, 1000, 4097), a chunk after cached keys,
    an empty sequence; causal, non-causal and a window that cuts through tiles."""
    n_q, n_k = [4097, 1, 97, 0, 700, 1000], [4097, 1, 97, 300, 2500, 1000]
    case = make_batch(generator, n_k, n_q, page_size=page_size, hkv=2, group=group, head_dim=128, dtype=dtype)
    check_case(*case)
    check_case(*case, causal=False)
    check_case(*case, window=1500)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_agree_and_differ_bitwise(generator, prefill_kernel, monkeypatch, head_dim):
    """Both kernels are correct on the same inputs, and on an sm_90 device the variable really switches kernels (the
    two accumulate in different orders, so some bf16 outputs differ in the last bit)."""
    if prefill_kernel != "wgmma":
        pytest.skip("compares both kernels in one run")
    case = make_batch(generator, [3000, 1500], [3000, 900], page_size=64, hkv=2, group=4, head_dim=head_dim,
                      dtype=torch.bfloat16)
    out_wgmma, _ = check_case(*case)
    monkeypatch.setenv("FLASHCORE_PREFILL_KERNEL", "mma")
    out_mma, _ = check_case(*case)
    torch.testing.assert_close(out_wgmma, out_mma, atol=2e-2, rtol=0)
    if _wgmma_applies():
        assert not torch.equal(out_wgmma, out_mma), "FLASHCORE_PREFILL_KERNEL did not change the kernel"


# ---- logit softcapping and attention sinks ------------------------------------------------------------------------
# Large scores (sm_scale = 3 / sqrt(D)) so that softcap 5 bites hard and 50 a little; sinks are random logits of
# scale 3 with head 0's at +20 (it dominates its rows: outputs near zero, lse near 20) and head 1's at -20.

SOFTCAP_SINKS = [(5.0, False), (50.0, True), (None, True)]


def random_sinks(hq, generator):
    sinks = 3 * torch.randn(hq, generator=generator)
    sinks[0], sinks[1] = 20.0, -20.0
    return sinks.cuda()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("softcap,with_sinks", SOFTCAP_SINKS)
def test_softcap_and_sinks(generator, dtype, head_dim, softcap, with_sinks):
    """The MIXED batch: full prompts, chunked prefill (n_q < n_k), single queries, an empty sequence, queries that
    see no key (zeros, lse = the sink); GQA 4."""
    n_q, n_k = zip(*MIXED)
    case = make_batch(generator, list(n_k), list(n_q), page_size=64, hkv=2, group=4, head_dim=head_dim, dtype=dtype)
    sinks = random_sinks(8, generator) if with_sinks else None
    check_case(*case, scale=3.0 * head_dim ** -0.5, softcap=softcap, sinks=sinks)


@pytest.mark.parametrize("causal,window", [(True, 1), (True, 100), (False, 1000)])
def test_softcap_and_sinks_with_window(generator, causal, window):
    n_q, n_k = zip(*MIXED)
    case = make_batch(generator, list(n_k), list(n_q), page_size=16, hkv=2, group=4, head_dim=128,
                      dtype=torch.bfloat16)
    check_case(*case, causal=causal, window=window, scale=3.0 * 128 ** -0.5, softcap=30.0,
               sinks=random_sinks(8, generator))


@pytest.mark.parametrize("dtype,head_dim,group", [(torch.bfloat16, 128, 4), (torch.float16, 64, 1)])
def test_softcap_and_sinks_long_sequences(generator, dtype, head_dim, group):
    """Many K/V tiles per CTA (the running max moves in capped units): a 4097-key prompt and a 1000-query chunk after
    3097 cached keys."""
    case = make_batch(generator, [4097, 4097], [4097, 1000], page_size=16, hkv=2, group=group, head_dim=head_dim,
                      dtype=dtype)
    check_case(*case, scale=3.0 * head_dim ** -0.5, softcap=20.0, sinks=random_sinks(2 * group, generator))


def test_sinks_at_minus_inf_change_nothing(generator):
    """A sink of -inf adds exp(-inf) = 0: bit for bit the result without sinks (rows without keys included)."""
    q, k_cache, v_cache, row_offsets, cols, counts, q_indptr = make_batch(
        generator, [700, 300, 5], [700, 100, 9], page_size=64, hkv=2, group=4, head_dim=128, dtype=torch.bfloat16)
    layout = _layout(row_offsets, cols, counts)
    sinks = torch.full((8,), -math.inf, device="cuda")
    for softcap in (None, 10.0):
        out, lse = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr, softcap=softcap, return_lse=True)
        out_s, lse_s = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr, softcap=softcap, sinks=sinks,
                                          return_lse=True)
        assert torch.equal(out, out_s) and torch.equal(lse, lse_s)


def test_softcap_kernels_agree_and_differ_bitwise(generator, prefill_kernel, monkeypatch):
    """The softcap variants of both kernels are correct on the same inputs, and on an sm_90 device the wgmma one
    really runs (its outputs differ from the mma.sync kernel's in some last bits)."""
    if prefill_kernel != "wgmma":
        pytest.skip("compares both kernels in one run")
    case = make_batch(generator, [3000, 1500], [3000, 900], page_size=64, hkv=2, group=4, head_dim=128,
                      dtype=torch.bfloat16)
    opts = dict(scale=3.0 * 128 ** -0.5, softcap=15.0, sinks=random_sinks(8, generator))
    out_wgmma, _ = check_case(*case, **opts)
    monkeypatch.setenv("FLASHCORE_PREFILL_KERNEL", "mma")
    out_mma, _ = check_case(*case, **opts)
    torch.testing.assert_close(out_wgmma, out_mma, atol=2e-2, rtol=0)
    if _wgmma_applies():
        assert not torch.equal(out_wgmma, out_mma), "FLASHCORE_PREFILL_KERNEL did not change the kernel"
