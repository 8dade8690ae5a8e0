"""CPU paged_attention against the float64 reference: odd sizes, scattered pages, GQA, causal offsets, windows."""
import math

import pytest
import torch

import flashcore_hf as fc
from tests.reference import random_paged_kv, reference_paged_attention

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _run_case(generator, lengths, q_lens, *, page_size, hkv, group, head_dim, dtype, causal=True, window=None,
              sm_scale=None, softcap=None, sinks=False):
    k_cache, v_cache, row_offsets, cols, counts = random_paged_kv(lengths, page_size, hkv, head_dim, dtype=dtype,
                                                                  generator=generator)
    q_indptr = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(q_indptr[-1]), hkv * group, head_dim, generator=generator).to(dtype)
    layout = fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))
    sink_logits = 3 * torch.randn(hkv * group, generator=generator) if sinks else None
    out, lse = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr, causal=causal, sm_scale=sm_scale,
                                  sliding_window=window, softcap=softcap, sinks=sink_logits, return_lse=True)
    ref_out, ref_lse = reference_paged_attention(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr,
                                                 causal=causal, sm_scale=sm_scale, sliding_window=window,
                                                 softcap=softcap, sinks=sink_logits)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    # Low-precision outputs are compared against the reference rounded to the same dtype, plus a tolerance of a
    # few ulps, so that the check is as strict as the storage format allows.
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [40, 80, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_and_prefill_shapes(generator, dtype, head_dim, group):
    lengths = [1, 97, 257]
    _run_case(generator, lengths, q_lens=[1, 1, 1], page_size=16, hkv=2, group=group, head_dim=head_dim, dtype=dtype)
    _run_case(generator, lengths, q_lens=[1, 97, 40], page_size=16, hkv=2, group=group, head_dim=head_dim,
              dtype=dtype)


@pytest.mark.parametrize("page_size", [1, 16, 128])
def test_page_sizes_and_partial_pages(generator, page_size):
    _run_case(generator, [1, 97, 257, 128], q_lens=[1, 5, 16, 128], page_size=page_size, hkv=2, group=4,
              head_dim=64, dtype=torch.float32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 7, 64])
def test_causal_offsets_and_sliding_window(generator, causal, window):
    # chunked prefill: n_q queries after n_k - n_q cached keys
    _run_case(generator, [97, 257, 30], q_lens=[33, 257, 1], page_size=16, hkv=2, group=2, head_dim=40,
              dtype=torch.float32, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap, sinks", [(5.0, False), (None, True), (2.0, True)])
@pytest.mark.parametrize("window", [None, 7])
def test_softcap_and_sinks(generator, dtype, softcap, sinks, window):
    """Gemma 2/3 logit softcapping and GPT-OSS attention sinks, decode and chunked prefill; large scores (sm_scale
    3) so that the cap bites."""
    for q_lens in ([1, 1, 1], [33, 97, 1]):
        _run_case(generator, [97, 257, 30], q_lens=q_lens, page_size=16, hkv=2, group=4, head_dim=64, dtype=dtype,
                  window=window, sm_scale=3.0 * 64 ** -0.5, softcap=softcap, sinks=sinks)


def test_sinks_on_rows_without_keys(generator):
    """A row that sees no key gives zeros and lse = its sink logit."""
    out, lse = _run_case(generator, [3], q_lens=[5], page_size=4, hkv=1, group=2, head_dim=16, dtype=torch.float32,
                         sinks=True)
    assert torch.all(out[:2] == 0) and torch.all(torch.isfinite(lse))


def test_more_queries_than_keys_gives_zero_rows(generator):
    # n_q > n_k: the first queries sit at negative positions and see no key (zeros, lse = -inf)
    out, lse = _run_case(generator, [3], q_lens=[5], page_size=4, hkv=1, group=2, head_dim=16, dtype=torch.float32)
    assert torch.all(out[:2] == 0) and torch.all(lse[:2] == -math.inf)


def test_empty_sequences(generator):
    out, lse = _run_case(generator, [0, 20, 0, 5], q_lens=[2, 3, 0, 1], page_size=8, hkv=2, group=2, head_dim=32,
                         dtype=torch.bfloat16)
    assert torch.all(out[:2] == 0) and torch.all(lse[:2] == -math.inf)


def test_custom_scale_and_strided_q(generator):
    k_cache, v_cache, row_offsets, cols, counts = random_paged_kv([50, 9], 8, 2, 32, generator=generator)
    q_full = torch.randn(7, 3, 4, 32, generator=generator)          # take a strided [7, 4, 32] view
    q = q_full[:, 1]
    assert not q.is_contiguous()
    q_indptr = torch.tensor([0, 4, 7], dtype=torch.int32)
    layout = fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))
    out = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr, sm_scale=0.3)
    ref, _ = reference_paged_attention(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, sm_scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_sparse_page_list_in_any_order(generator):
    """A sequence may read any pages in any order, partial ones included (what sparse selection produces)."""
    k_cache = torch.randn(10, 8, 2, 16, generator=generator)
    v_cache = torch.randn(10, 8, 2, 16, generator=generator)
    row_offsets = torch.tensor([0, 4], dtype=torch.int32)
    cols = torch.tensor([7, 2, 9, 0], dtype=torch.int32)
    counts = torch.tensor([8, 3, 8, 5], dtype=torch.int32)
    q = torch.randn(1, 4, 16, generator=generator)
    q_indptr = torch.tensor([0, 1], dtype=torch.int32)
    out = fc.paged_attention(q, k_cache, v_cache, fc.PageLayout(row_offsets, cols, counts, cols * 0 - 1), q_indptr)
    keys = torch.cat([k_cache[7, :8], k_cache[2, :3], k_cache[9, :8], k_cache[0, :5]]).double()
    vals = torch.cat([v_cache[7, :8], v_cache[2, :3], v_cache[9, :8], v_cache[0, :5]]).double()
    keys, vals = keys.repeat_interleave(2, dim=1), vals.repeat_interleave(2, dim=1)   # [24, 4, 16]
    probs = torch.softmax(torch.einsum("hd,khd->hk", q[0].double(), keys) / 4.0, dim=-1)
    expected = torch.einsum("hk,khd->hd", probs, vals)
    torch.testing.assert_close(out[0].double(), expected, atol=2e-5, rtol=2e-5)


def test_opcheck(generator):
    k_cache, v_cache, row_offsets, cols, counts = random_paged_kv([13, 40], 8, 2, 16, generator=generator)
    q = torch.randn(6, 4, 16, generator=generator)
    q_indptr = torch.tensor([0, 2, 6], dtype=torch.int32)
    layout = fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))
    plan = fc.plan_attention(layout, q_indptr, num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
                             dtype=q.dtype, causal=True, sm_scale=0.25)
    torch.library.opcheck(torch.ops.flashcore.paged_attention,
                          (q, k_cache, v_cache, row_offsets, cols, counts, q_indptr, True, 0.25, 0, 0.0, None,
                           list(plan.data), None))


@pytest.mark.parametrize("causal", [True, False])
def test_per_kv_head_page_lists(generator, causal):
    """row_offsets with B * Hkv + 1 entries: every kv head of every sequence reads its own page list."""
    hkv, group, d, page_size = 3, 2, 24, 4
    lengths = [10, 0, 7, 13, 5, 9]                       # (b, h) rows for B = 2, Hkv = 3
    k_cache, v_cache, row_offsets, cols, counts = random_paged_kv(lengths, page_size, hkv, d, generator=generator)
    q_indptr = torch.tensor([0, 2, 3], dtype=torch.int32)
    q = torch.randn(3, hkv * group, d, generator=generator)
    layout = fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))
    out, lse = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr, causal=causal, return_lse=True)
    ref_out, ref_lse = reference_paged_attention(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr,
                                                 causal=causal)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    assert torch.all(out[:2, 2:4] == 0)                 # sequence 0, kv head 1 reads no page
    # and a per-head layout that lists the same pages for every head equals the per-sequence layout
    same = fc.PageLayout(torch.tensor([0, 2, 4, 6], dtype=torch.int32), torch.tensor([0, 1] * 3, dtype=torch.int32),
                         torch.tensor([4, 3] * 3, dtype=torch.int32), torch.full((6,), -1, dtype=torch.int32))
    shared = fc.PageLayout(torch.tensor([0, 2], dtype=torch.int32), same.cols[:2], same.token_counts[:2],
                           same.staging_ids[:2])
    q1, qi1 = q[:2], torch.tensor([0, 2], dtype=torch.int32)
    torch.testing.assert_close(fc.paged_attention(q1, k_cache, v_cache, same, qi1),
                               fc.paged_attention(q1, k_cache, v_cache, shared, qi1))


def test_decode_threshold_agrees_with_the_compiled_planner():
    """plan.py decides whether a shape-only plan will do with the same threshold the compiled planner uses."""
    import re
    from pathlib import Path

    from flashcore_hf.ops.plan import DECODE_QUERIES_PER_SEQUENCE

    header = (Path(__file__).parents[1] / "csrc" / "bindings" / "plan.h").read_text()
    assert int(re.search(r"kDecodeQueriesPerSequence = (\d+);", header).group(1)) == DECODE_QUERIES_PER_SEQUENCE
