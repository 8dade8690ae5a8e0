"""The CUDA selection kernels (flashcore_hf.ops.select_pages, candidate_page_scores, select_candidate_pages; append_kv
with key bounds) against
float64 references and the CPU op: odd page counts, scattered page ids, sinks / padding, every dtype pair, GQA groups, several queries per
sequence, strided q, budgets from 1 to all pages, and inside a CUDA graph."""
import pytest
import torch

import flashcore_hf as fc
from flashcore_hf.ops import append_kv, candidate_page_scores, select_candidate_pages, select_pages
from flashcore_hf.sparse import padded_page_table
from tests.sparse_reference import (assert_topk_picks, reference_candidate_scores, reference_page_scores,
                                    reference_select_candidates, tied_scores)

pytestmark = pytest.mark.gpu


def _table(lengths_in_pages, max_pages, num_pages, generator, sinks=1, recent=2):
    cols = torch.randperm(num_pages, generator=generator)[:sum(lengths_in_pages)].to(torch.int32)
    counts = torch.randint(1, 17, (cols.numel(),), dtype=torch.int32, generator=generator)
    offsets = torch.tensor([0, *torch.tensor(lengths_in_pages).cumsum(0).tolist()], dtype=torch.int32)
    layout = fc.PageLayout(offsets, cols, counts, torch.full_like(cols, -1))
    return padded_page_table(layout, max_pages, sinks, recent)


def _captured(fn):
    """(graph, out): fn run once on a side stream (warm-up), then captured; replaying the graph refills out."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _cuda(table):
    return type(table)(table.pages.cuda(), table.counts.cuda(), table.bias.cuda())


CASES = [  # (pages per sequence, Hkv, group, query_len, D, q dtype, bounds dtype, reduction)
    ([37], 8, 4, 1, 128, torch.bfloat16, torch.bfloat16, "max"),
    ([1000, 3, 257], 2, 7, 1, 64, torch.float16, torch.float32, "max"),
    ([2048], 8, 4, 1, 128, torch.bfloat16, torch.bfloat16, "sum"),
    ([129, 64], 1, 1, 16, 256, torch.float32, torch.float32, "max"),
    ([300, 5], 4, 8, 3, 96, torch.bfloat16, torch.float32, "sum"),     # 24 query heads per kv head: 3 passes
    ([5000], 1, 2, 2, 4, torch.float16, torch.float32, "max"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{max(c[0])}-Hkv{c[1]}-G{c[2]}-nq{c[3]}-D{c[4]}")
def test_select_pages_cuda_is_a_top_k_of_the_reference(case, generator):
    lengths, hkv, group, query_len, d, q_dtype, bounds_dtype, reduction = case
    max_pages = max(lengths)
    num_pages = sum(lengths) + 7
    table = _table(lengths, max_pages, num_pages, generator)
    bounds = torch.randn(num_pages, hkv, 2 * d, generator=generator).to(bounds_dtype)
    # q as a strided view (heads interleaved with something else), like a slice of a fused projection
    wide = torch.randn(len(lengths) * query_len, hkv * group, 2 * d, generator=generator).to(q_dtype)
    q = wide[..., :d]
    scores = reference_page_scores(q, bounds, table, query_len, reduction)
    atol = 1e-4 * float(scores[torch.isfinite(scores)].abs().max())
    gpu_table = _cuda(table)
    for budget in sorted({1, 16, 64, max_pages // 2 + 1, max_pages} - {0}):
        if budget > max_pages:
            continue
        picked, counts = select_pages(q.cuda(), bounds.cuda(), gpu_table.pages, gpu_table.counts, gpu_table.bias,
                                      budget, query_len, reduction)
        for b in range(len(lengths)):  # every output entry written (outputs start as uninitialized memory)
            assert set(picked[b].flatten().tolist()) <= set(table.pages[b].tolist())
        assert_topk_picks(picked.cpu(), counts.cpu(), scores, table, budget, atol)
        cpu_picked, cpu_counts = select_pages(q, bounds, table.pages, table.counts, table.bias, budget, query_len,
                                              reduction)
        same = (cpu_picked == picked.cpu()).all(dim=2).float().mean().item()
        assert same >= 0.9, f"CPU and CUDA picks agree on only {same:.0%} of the rows (budget {budget})"


def test_select_pages_cuda_in_a_graph_follows_new_queries(generator):
    lengths, hkv, group, d = [700, 120], 8, 4, 128
    table = _cuda(_table(lengths, 700, 900, generator))
    bounds = torch.randn(900, hkv, 2 * d, generator=generator).to(torch.bfloat16).cuda()
    q = torch.randn(2, hkv * group, d, generator=generator).to(torch.bfloat16).cuda()
    select = lambda: select_pages(q, bounds, table.pages, table.counts, table.bias, 32)  # noqa: E731
    graph, out = _captured(select)
    for _ in range(3):
        q.copy_(torch.randn(q.shape, generator=generator).to(torch.bfloat16))
        graph.replay()
        eager = select()
        torch.cuda.synchronize()
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])


CANDIDATE_CASES = [  # (batch, Hkv, group, query_len, D, page_size, candidates, dtype)
    (1, 8, 4, 1, 128, 64, 256, torch.bfloat16),     # the rerank=4 shape of a 4K budget in 64-token pages
    (3, 2, 7, 1, 64, 16, 37, torch.float16),
    (2, 4, 2, 3, 96, 24, 50, torch.bfloat16),        # 6 query heads per kv head, head dim not a power of two
    (1, 1, 16, 1, 256, 1, 300, torch.float32),       # 16 query heads: two passes over the staged queries
    (2, 2, 1, 2, 20, 7, 9, torch.float32),
]


@pytest.mark.parametrize("case", CANDIDATE_CASES, ids=lambda c: f"B{c[0]}-Hkv{c[1]}-G{c[2]}-nq{c[3]}-D{c[4]}-P{c[5]}")
def test_candidate_page_scores_cuda_match_float64(case, generator):
    """The rerank stage's exact scores on the GPU: every candidate's max over its valid keys (partial pages, pages
    longer than their count) and the kv head's query heads, forced pages +inf, padding entries and page ids outside
    the pool -inf, strided q; equal to the CPU op up to fp32 rounding."""
    batch, hkv, group, query_len, d, page_size, candidates, dtype = case
    num_pages = 3 * candidates + 5
    k_pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype)
    q = torch.randn(batch * query_len, hkv * group, 2 * d, generator=generator).to(dtype)[..., :d]
    cols = torch.randint(-1, num_pages + 2, (batch, hkv, candidates), generator=generator, dtype=torch.int32)
    counts = torch.randint(0, page_size + 2, (batch, hkv, candidates), generator=generator, dtype=torch.int32)
    forced = torch.stack([cols[b, 0, :2] for b in range(batch)]).contiguous()
    want = reference_candidate_scores(q, k_pool, cols, counts, forced)
    got = candidate_page_scores(q.cuda(), k_pool.cuda(), cols.cuda(), counts.cuda(), forced.cuda(), query_len)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isinf(got.cpu()) & (got.cpu() > 0), torch.isinf(want) & (want > 0))
    assert torch.equal(torch.isinf(got.cpu()) & (got.cpu() < 0), torch.isinf(want) & (want < 0))
    scale = float(want[finite].abs().max())
    torch.testing.assert_close(got.cpu().double()[finite], want[finite], atol=1e-5 * scale * d ** 0.5, rtol=1e-5)
    cpu = candidate_page_scores(q, k_pool, cols, counts, forced, query_len)
    torch.testing.assert_close(got.cpu()[finite], cpu[finite], atol=1e-5 * scale * d ** 0.5, rtol=1e-5)


def test_candidate_page_scores_cuda_in_a_graph_follows_new_queries(generator):
    hkv, group, d, page_size = 8, 4, 128, 64
    k_pool = torch.randn(600, page_size, hkv, d, generator=generator).to(torch.bfloat16).cuda()
    cols = torch.randint(0, 600, (1, hkv, 256), generator=generator, dtype=torch.int32).cuda()
    counts = torch.full_like(cols, page_size)
    forced = cols[:, 0, :3].contiguous()
    q = torch.randn(1, hkv * group, d, generator=generator).to(torch.bfloat16).cuda()
    score = lambda: candidate_page_scores(q, k_pool, cols, counts, forced)  # noqa: E731
    graph, out = _captured(score)
    for _ in range(3):
        q.copy_(torch.randn(q.shape, generator=generator).to(torch.bfloat16))
        graph.replay()
        eager = score()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


ROWS = (2, 3)
"""Leading dims of the select cases given by their candidate count alone."""


@pytest.mark.parametrize("shape, budget", [
    ((1, 8, 256), 64), ((3, 2, 37), 5), ((2, 4, 1000), 999), ((7,), 1),
    ((1, 2, 50_000), 300),                      # rows past the keys held in registers (read from global)
    *(((*ROWS, candidates), budget) for candidates, budget in [
        (32, 32), (33, 32), (40, 33), (500, 64), (2048, 64), (2047, 100), (300, 129), (200, 200), (4096, 256),
        (16384, 256), (16384, 1), (9000, 17), (600, 257), (6000, 300)])])  # 6000: 8 keys per thread, in registers
@pytest.mark.parametrize("order", ["random", "ties", "ascending", "descending"])
def test_select_candidate_pages_cuda_equal_the_cpu_op(shape, budget, order, generator):
    """The rerank stage's pick on the GPU (the radix select kernel over a table per row) equals the CPU op and the
    sorting reference bit for bit: budgets 1-999 on rows of 7-50,000 entries, random, tied (ties to the lower index,
    both zeros, infinities and NaNs in total order) and already sorted either way (the threshold at either end of
    the row)."""
    if order == "ties":
        scores = tied_scores(shape, generator)
    else:
        scores = torch.randn(shape, generator=generator)
        if order != "random":
            scores = scores.sort(dim=-1, descending=order == "descending").values.contiguous()
    cols = torch.randint(-1, 100_000, shape, generator=generator, dtype=torch.int32)
    counts = torch.randint(0, 65, shape, generator=generator, dtype=torch.int32)
    got = select_candidate_pages(scores.cuda(), cols.cuda(), counts.cuda(), budget)
    cpu = select_candidate_pages(scores, cols, counts, budget)
    assert torch.equal(got[0].cpu(), cpu[0]) and torch.equal(got[1].cpu(), cpu[1])
    if scores.numel() <= 25_000:
        want = reference_select_candidates(scores, cols, counts, budget)
        assert torch.equal(cpu[0], want[0]) and torch.equal(cpu[1], want[1])


def test_select_candidate_pages_cuda_in_a_graph_follow_new_scores(generator):
    scores = torch.randn(1, 8, 256, generator=generator).cuda()
    cols = torch.randint(0, 600, (1, 8, 256), generator=generator, dtype=torch.int32).cuda()
    counts = torch.randint(1, 65, (1, 8, 256), generator=generator, dtype=torch.int32).cuda()
    pick = lambda: select_candidate_pages(scores, cols, counts, 64)  # noqa: E731
    graph, out = _captured(pick)
    for _ in range(3):
        scores.copy_(torch.randn(scores.shape, generator=generator))
        graph.replay()
        eager = pick()
        torch.cuda.synchronize()
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])


@pytest.mark.parametrize("k_dtype,bounds_dtype,d", [(torch.bfloat16, torch.bfloat16, 128), (torch.float16, torch.float32, 64),
                                                    (torch.float32, torch.float32, 20)])
@pytest.mark.parametrize("with_signs", [False, True], ids=["bounds", "bounds+signs"])
def test_append_kv_with_bounds_cuda_equals_cpu(k_dtype, bounds_dtype, d, with_signs, generator):
    """append_kv with key bounds (and signs): the fused CUDA kernel writes the same K/V, bounds and sign bytes as the
    CPU op (append, then fold the appended keys), for new keys given with strides (rows of a wider tensor)."""
    num_pages, page_size, hkv = 40, 16, 8
    pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(k_dtype)
    v_pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(k_dtype)
    bounds = torch.randn(num_pages, hkv, 2 * d, generator=generator).to(bounds_dtype)
    signs = torch.randint(0, 256, (num_pages, hkv, page_size, -(-d // 8)), generator=generator, dtype=torch.uint8)
    gpu = [t.cuda() for t in (pool, v_pool, bounds, signs)]
    for step in range(3):   # offsets 0 (restart), then widening; one token per page; padding slots skipped
        pages = torch.randperm(num_pages, generator=generator)[:9]
        offset = torch.randint(0, page_size, (9,), generator=generator) * (step > 0)
        slots = torch.cat([pages * page_size + offset, torch.tensor([-1, -5])]).to(torch.int32)
        k, v = (torch.randn(11, hkv, 2 * d, generator=generator).to(k_dtype)[..., :d] for _ in range(2))
        append_kv(pool, v_pool, k, v, slots, key_bounds=bounds, key_signs=signs if with_signs else None)
        append_kv(gpu[0], gpu[1], k.cuda(), v.cuda(), slots.cuda().long(), key_bounds=gpu[2],
                  key_signs=gpu[3] if with_signs else None)
        for ours, want in zip(gpu, (pool, v_pool, bounds, signs)):
            torch.testing.assert_close(ours.cpu(), want, rtol=0, atol=0)
    untouched = torch.zeros(num_pages + 1, hkv, 2 * d, device="cuda")
    k_one = torch.randn(1, hkv, d, device="cuda").to(k_dtype)
    before = [t.clone() for t in gpu[:2]]
    append_kv(gpu[0], gpu[1], k_one, k_one, torch.tensor([num_pages * page_size], device="cuda"),
              key_bounds=untouched[:num_pages])
    assert not untouched.any()  # a slot outside the pool writes nothing
    assert all(torch.equal(a, b) for a, b in zip(gpu[:2], before))


def test_select_pages_cuda_rejects_unsupported_head_dim():
    q = torch.randn(1, 2, 6, device="cuda")
    bounds = torch.randn(4, 1, 12, device="cuda")
    pages = torch.zeros(1, 4, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="head_dim % 4"):
        select_pages(q, bounds, pages, torch.ones_like(pages), torch.zeros(1, 4, device="cuda"), 2)
