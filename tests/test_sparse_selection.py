"""CPU tests of sparse page selection: config, key summaries, Quest scores, budget, sinks/recent, fixed shapes,
no host sync, and "budget >= context gives the dense result"."""
import math

import pytest
import torch

import flashcore_hf as fc
from flashcore_hf.ops import append_kv, candidate_page_scores, select_candidate_pages, select_pages
from flashcore_hf.sparse import (PageKeySummaries, SparseConfig, StepSelection, padded_page_table, refresh_slots,
                                 step_is_sparse, streaming_layout, topk_layout)
from tests.reference import random_paged_kv, reference_paged_attention
from tests.sparse_reference import (append_pool_keys, assert_same_stored_keys, assert_topk_picks,
                                    reference_candidate_scores, reference_page_scores, reference_select_candidates,
                                    tied_scores, unpack_signs)


def _dense_layout(lengths, page_size, hkv, d, generator):
    """Random scattered pages for sequences of `lengths` keys: (k_cache, v_cache, per-sequence PageLayout)."""
    k_cache, v_cache, row_offsets, cols, counts = random_paged_kv(lengths, page_size, hkv, d, generator=generator)
    return k_cache, v_cache, fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))


def _rows(layout):
    """[(cols, counts)] per layout row, as Python lists."""
    offsets = layout.row_offsets.tolist()
    return [(layout.cols[a:b].tolist(), layout.token_counts[a:b].tolist()) for a, b in zip(offsets, offsets[1:])]


# ---- config ------------------------------------------------------------------------------------------------------

def test_config_defaults_and_validation():
    with pytest.raises(ValueError, match="rerank"):
        SparseConfig(policy="topk", rerank=-1)
    assert SparseConfig().policy == "dense" and not SparseConfig().enabled
    cfg = SparseConfig(policy="topk", token_budget=4096, sink_tokens=4, recent_tokens=64)
    assert cfg.page_counts(64) == (64, 1, 1)
    assert cfg.page_counts(16) == (256, 1, 4)
    assert SparseConfig(policy="topk", token_budget=100, sink_tokens=0, recent_tokens=0).page_counts(8) == (12, 0, 1)
    for bad in ({"policy": "quest"}, {"token_budget": 0}, {"sink_tokens": -1}, {"dense_layers": 1.5},
                {"head_reduction": "mean"}, {"max_query_len": 0}, {"max_query_len": 17},
                {"token_budget": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SparseConfig(**bad)
    with pytest.raises(ValueError, match="token_budget"):
        SparseConfig(policy="streaming", token_budget=64, sink_tokens=64, recent_tokens=64).page_counts(64)
    assert cfg.is_sparse_layer(2) and not cfg.is_sparse_layer(1)
    assert not cfg.is_sparse_layer(5, "sliding_attention")
    assert not SparseConfig(dense_layers=0).is_sparse_layer(3)


def test_step_is_sparse():
    cfg = SparseConfig(policy="topk", token_budget=32, sink_tokens=8, recent_tokens=8)       # 4 pages of 8
    assert step_is_sparse(cfg, query_len=1, max_pages=5, page_size=8)
    assert not step_is_sparse(cfg, query_len=1, max_pages=4, page_size=8)                  # fits: dense
    assert not step_is_sparse(cfg, query_len=17, max_pages=50, page_size=8)                # prefill: dense
    assert step_is_sparse(cfg, query_len=16, max_pages=50, page_size=8)                    # 16 tokens span <= 3 pages
    assert not step_is_sparse(SparseConfig(policy="topk", token_budget=16, sink_tokens=8, recent_tokens=8),
                              query_len=10, max_pages=50, page_size=8)               # sinks + 2 new-token pages > 2
    assert not step_is_sparse(SparseConfig(), query_len=1, max_pages=50, page_size=8)


# ---- key summaries -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summaries_are_min_max_of_valid_tokens(generator, dtype):
    page_size, hkv, d, num_pages = 5, 3, 7, 9
    pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype)
    pages = torch.tensor([4, 0, 7, 2], dtype=torch.int32)
    counts = torch.tensor([5, 1, 3, 4], dtype=torch.int32)
    summaries = PageKeySummaries()
    summaries.refresh(pool, *refresh_slots(pages, counts, page_size))
    assert summaries.bounds.shape == (num_pages, hkv, 2 * d) and summaries.bounds.dtype == dtype
    for page, count in zip(pages.tolist(), counts.tolist()):
        valid = pool[page, :count]                                          # [count, Hkv, D]
        torch.testing.assert_close(summaries.bounds[page, :, :d], valid.amax(0), rtol=0, atol=0)
        torch.testing.assert_close(summaries.bounds[page, :, d:], valid.amin(0), rtol=0, atol=0)
    assert torch.all(summaries.bounds[[1, 3, 5, 6, 8]] == 0)               # pages never refreshed


def test_summaries_reused_page_forgets_old_tokens_and_pool_growth(generator):
    page_size, hkv, d = 4, 2, 6
    pool = torch.randn(3, page_size, hkv, d, generator=generator)
    pool[1] += 100.0                                                        # old tokens with large keys
    summaries = PageKeySummaries()
    summaries.refresh(pool, *refresh_slots(torch.tensor([1]), torch.tensor([4]), page_size))
    assert summaries.bounds[1, :, :d].min() > 90
    pool[1, :2] = torch.randn(2, hkv, d, generator=generator)               # page reused: 2 new tokens
    summaries.refresh(pool, *refresh_slots(torch.tensor([1]), torch.tensor([2]), page_size))
    torch.testing.assert_close(summaries.bounds[1, :, :d], pool[1, :2].amax(0), rtol=0, atol=0)
    torch.testing.assert_close(summaries.bounds[1, :, d:], pool[1, :2].amin(0), rtol=0, atol=0)
    grown = torch.cat([pool, torch.randn(4, page_size, hkv, d, generator=generator)])   # the pool grew
    summaries.refresh(grown, *refresh_slots(torch.tensor([6]), torch.tensor([3]), page_size))
    assert summaries.bounds.shape[0] == 7
    torch.testing.assert_close(summaries.bounds[1, :, :d], pool[1, :2].amax(0), rtol=0, atol=0)  # kept
    torch.testing.assert_close(summaries.bounds[6, :, d:], grown[6, :3].amin(0), rtol=0, atol=0)


def test_summaries_refresh_in_chunks(generator, monkeypatch):
    import flashcore_hf.sparse.summaries as summaries_module
    monkeypatch.setattr(summaries_module, "_REFRESH_CHUNK_ELEMENTS", 1)     # one page per chunk
    pool = torch.randn(6, 3, 2, 4, generator=generator)
    summaries = PageKeySummaries()
    pages, counts = torch.tensor([5, 2, 0]), torch.tensor([3, 2, 1])
    summaries.refresh(pool, *refresh_slots(pages, counts, 3))
    for page, count in zip(pages.tolist(), counts.tolist()):
        torch.testing.assert_close(summaries.bounds[page, :, 4:], pool[page, :count].amin(0), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_update_matches_refresh_and_restarts_reused_pages(generator, dtype):
    """append_kv with key bounds (PageKeySummaries.append_decode) folds one new key per page into its bounds: token
    by token it builds exactly the bounds a full refresh computes, starts over at offset 0 (a reused page), and skips
    negative slots."""
    page_size, hkv, d, num_pages = 4, 2, 6, 5
    pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype)
    pool[3] += 50                                                           # old tokens of a page about to be reused
    incremental, full = PageKeySummaries(), PageKeySummaries()
    incremental.refresh(pool, *refresh_slots(torch.tensor([3]), torch.tensor([4]), page_size))
    pool[3] = torch.randn(page_size, hkv, d, generator=generator).to(dtype)
    for offset in range(page_size):                                        # pages 3 and 1 fill in step
        slots = torch.tensor([3 * page_size + offset, -1, 1 * page_size + offset], dtype=torch.int32)
        append_pool_keys(incremental, pool, slots)
        full.refresh(pool, *refresh_slots(torch.tensor([3, 1]), torch.tensor([offset + 1] * 2), page_size))
        torch.testing.assert_close(incremental.bounds[[1, 3]], full.bounds[[1, 3]], rtol=0, atol=0)
    assert incremental.bounds.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)


def test_append_kv_with_bounds_rejects_bad_input():
    bounds = torch.zeros(4, 2, 12)
    pool, v_pool = torch.randn(4, 3, 2, 6), torch.zeros(4, 3, 2, 6)
    before = pool.clone()
    k = torch.randn(2, 2, 6)

    def append(bounds_, slots, signs=None, k_=k):
        append_kv(pool, v_pool, k_[:slots.numel()], k_[:slots.numel()], slots, key_bounds=bounds_, key_signs=signs)

    with pytest.raises(RuntimeError, match="one new token per page"):
        append(bounds, torch.tensor([3, 4]))                                # both on page 1
    with pytest.raises(RuntimeError, match="slot_mapping.*outside"):
        append(bounds, torch.tensor([12]))
    with pytest.raises(RuntimeError, match="key_bounds must be"):
        append(torch.zeros(4, 2, 6), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="bfloat16 keys"):
        append(bounds.bfloat16(), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="no key_bounds row"):
        append(bounds[:1], torch.tensor([3]))                               # page 1, bounds for page 0 only
    with pytest.raises(RuntimeError, match="key_signs needs key_bounds"):
        append(None, torch.tensor([0]), torch.zeros(4, 2, 3, 1, dtype=torch.uint8))
    assert torch.all(bounds == 0) and torch.equal(pool, before) and not v_pool.any()   # a rejected call writes nothing


# ---- scores and top-k --------------------------------------------------------------------------------------------

def test_upper_bound_holds_and_is_tight_for_single_token_pages(generator):
    page_size, hkv, group, d = 4, 2, 3, 8
    lengths = [13, 4, 9]
    k_cache, _, layout = _dense_layout(lengths, page_size, hkv, d, generator)
    max_pages = 4
    table = padded_page_table(layout, max_pages, 0, 0)
    summaries = PageKeySummaries()
    summaries.refresh(k_cache, *refresh_slots(layout.cols, layout.token_counts, page_size))
    q = torch.randn(len(lengths) * 2, hkv * group, d, generator=generator)  # n_q = 2
    for reduction in ("max", "sum"):
        scores = reference_page_scores(q, summaries.bounds, table, 2, reduction)
        assert scores.shape == (len(lengths), hkv, max_pages)
        for b, (cols, counts) in enumerate(_rows(layout)):
            for j, (page, count) in enumerate(zip(cols, counts)):
                keys = k_cache[page, :count]                                 # [count, Hkv, D]
                for h in range(hkv):
                    qh = q[2 * b:2 * b + 2, h * group:(h + 1) * group].reshape(-1, d)  # [n_q * G, D]
                    best = (qh @ keys[:, h].T).amax(dim=1)                  # best key of the page per query row
                    exact = best.max() if reduction == "max" else best.sum()
                    assert scores[b, h, j] >= exact - 1e-4
    one = torch.randn(5, 1, hkv, d, generator=generator)                    # pages of one token: bound == q.k
    summaries = PageKeySummaries()
    summaries.refresh(one, *refresh_slots(torch.arange(5), torch.ones(5, dtype=torch.int32), 1))
    q1 = torch.randn(1, hkv, d, generator=generator)
    table1 = padded_page_table(fc.PageLayout(torch.tensor([0, 5], dtype=torch.int32), torch.arange(5, dtype=torch.int32),
                                             torch.ones(5, dtype=torch.int32), torch.full((5,), -1)), 5, 0, 0)
    scores = reference_page_scores(q1, summaries.bounds, table1, 1)
    torch.testing.assert_close(scores[0].float(), torch.einsum("hd,phd->hp", q1[0], one[:, 0]))


@pytest.mark.parametrize("query_len,reduction,q_dtype,bounds_dtype", [
    (1, "max", torch.float32, torch.float32), (3, "sum", torch.float32, torch.float32),
    (2, "max", torch.bfloat16, torch.bfloat16), (1, "max", torch.float16, torch.float32)])
def test_select_pages_is_a_top_k_of_the_reference_scores(generator, query_len, reduction, q_dtype, bounds_dtype):
    """The op keeps the budget best pages of every (sequence, kv head) by the float64 reference score, sinks and
    recent pages always, padding never before the real pages run out; picks in key order."""
    hkv, group, d, max_pages = 3, 2, 12, 23
    lengths_in_pages = [23, 5, 17, 1]
    num_pages = sum(lengths_in_pages) + 4
    cols = torch.randperm(num_pages, generator=generator)[:sum(lengths_in_pages)].to(torch.int32)
    counts = torch.randint(1, 9, (cols.numel(),), dtype=torch.int32, generator=generator)
    offsets = torch.tensor([0, *torch.tensor(lengths_in_pages).cumsum(0).tolist()], dtype=torch.int32)
    layout = fc.PageLayout(offsets, cols, counts, torch.full_like(cols, -1))
    table = padded_page_table(layout, max_pages, sink_pages=1, recent_pages=2)
    bounds = torch.randn(num_pages, hkv, 2 * d, generator=generator).to(bounds_dtype)
    q = torch.randn(len(lengths_in_pages) * query_len, hkv * group, d, generator=generator).to(q_dtype)
    scores = reference_page_scores(q, bounds, table, query_len, reduction)
    for budget in (1, 4, 7, max_pages):
        picked, picked_counts = select_pages(q, bounds, table.pages, table.counts, table.bias, budget, query_len,
                                             reduction)
        assert picked.dtype == picked_counts.dtype == torch.int32
        assert_topk_picks(picked, picked_counts, scores, table, budget, atol=1e-4)
    sparse = topk_layout(q, bounds, table, budget_pages=4, query_len=query_len, head_reduction=reduction)
    batch = len(lengths_in_pages)
    assert sparse.row_offsets.tolist() == list(range(0, batch * hkv * 4 + 1, 4))
    assert sparse.cols.shape == sparse.token_counts.shape == sparse.staging_ids.shape == (batch * hkv * 4,)


def test_select_pages_ties_go_to_the_lower_index():
    """Equal scores: the lower table index wins (a deterministic order both backends follow)."""
    table_pages = torch.arange(8, dtype=torch.int32)[None]
    bounds = torch.ones(8, 1, 4)                                            # every page scores the same
    picked, _ = select_pages(torch.ones(1, 1, 2), bounds, table_pages, torch.ones_like(table_pages),
                             torch.zeros(1, 8), 3)
    assert picked.tolist() == [[[0, 1, 2]]]


def test_select_pages_rejects_bad_input():
    q, bounds = torch.randn(2, 4, 8), torch.randn(10, 2, 16)
    pages = torch.zeros(2, 5, dtype=torch.int32)
    counts, bias = torch.ones_like(pages), torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="budget must be in"):
        select_pages(q, bounds, pages, counts, bias, 6)
    with pytest.raises(RuntimeError, match="page id 10"):
        select_pages(q, bounds, torch.full_like(pages, 10), counts, bias, 2)
    with pytest.raises(RuntimeError, match="head_reduction"):
        select_pages(q, bounds, pages, counts, bias, 2, 1, "mean")
    with pytest.raises(RuntimeError, match=r"q.size\(0\)"):
        select_pages(q, bounds, pages, counts, bias, 2, query_len=2)
    with pytest.raises(RuntimeError, match="bounds must be"):
        select_pages(q, bounds[..., :8], pages, counts, bias, 2)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        select_pages(q, torch.randn(10, 3, 16), pages, counts, bias, 2)


# ---- selection ---------------------------------------------------------------------------------------------------

def test_padded_table_sinks_recent_and_padding():
    layout = fc.PageLayout(torch.tensor([0, 6, 8, 8], dtype=torch.int32), torch.arange(8, dtype=torch.int32) + 10,
                           torch.tensor([4, 4, 4, 4, 4, 1, 4, 3], dtype=torch.int32), torch.full((8,), -1))
    table = padded_page_table(layout, 6, sink_pages=1, recent_pages=2)
    inf = math.inf
    assert table.pages.shape == table.counts.shape == table.bias.shape == (3, 6)
    assert table.bias.tolist() == [[inf, 0, 0, 0, inf, inf], [inf, inf, -inf, -inf, -inf, -inf], [-inf] * 6]
    assert table.counts.tolist() == [[4, 4, 4, 4, 4, 1], [4, 3, 0, 0, 0, 0], [0] * 6]
    assert table.pages[:1].tolist() == [[10, 11, 12, 13, 14, 15]]
    assert int(table.pages.min()) >= 10 and int(table.pages.max()) <= 17    # padding repeats valid ids


def test_streaming_keeps_sinks_and_most_recent_pages():
    n = [9, 3]
    cols = torch.randperm(12).to(torch.int32)
    counts = torch.tensor([8] * 8 + [5] + [8, 8, 2], dtype=torch.int32)
    layout = fc.PageLayout(torch.tensor([0, 9, 12], dtype=torch.int32), cols, counts, torch.full((12,), -1))
    table = padded_page_table(layout, max(n), sink_pages=2, recent_pages=1)
    sparse = streaming_layout(table, budget_pages=5)
    rows = _rows(sparse)
    assert sparse.row_offsets.tolist() == [0, 5, 10]
    c = cols.tolist()
    assert rows[0] == ([c[0], c[1], c[6], c[7], c[8]], [8, 8, 8, 8, 5])    # 2 sinks + 3 newest, in key order
    assert sorted(zip(*rows[1]), key=lambda e: -e[1])[:3] == [(c[9], 8), (c[10], 8), (c[11], 2)]
    assert sum(rows[1][1]) == 18                                           # the rest are empty padding pages


def test_selection_shapes_depend_only_on_sizes(generator):
    """Fixed shapes: the sparse layout's sizes follow (B, Hkv, budget), never the data (no host sync needed)."""
    cfg = SparseConfig(policy="topk", token_budget=24, sink_tokens=4, recent_tokens=4, dense_layers=0)
    page_size, hkv, d = 4, 2, 8
    shapes = set()
    for lengths in ([40, 9, 33], [17, 40, 1], [40, 40, 40]):
        k_cache, _, layout = _dense_layout(lengths, page_size, hkv, d, generator)
        summaries = PageKeySummaries()
        summaries.refresh(k_cache, *refresh_slots(layout.cols, layout.token_counts, page_size))
        step = StepSelection(cfg, layout, max_pages=10, query_len=1, page_size=page_size)
        sparse = step.layout_for(torch.randn(3, 2 * hkv, d, generator=generator), summaries)
        shapes.add(tuple(tuple(t.shape) for t in sparse))
        assert step.max_pages_per_row == 6
        for (_, counts), n in zip(_rows(sparse), [n for n in lengths for _ in range(hkv)]):
            assert sum(c > 0 for c in counts) == min(math.ceil(n / page_size), 6)   # the rest: empty padding
    assert shapes == {((3 * hkv + 1,), (3 * hkv * 6,), (3 * hkv * 6,), (3 * hkv * 6,))}


def _selection_fn(layout, q, bounds, max_pages, budget, sinks, recent):
    table = padded_page_table(layout, max_pages, sinks, recent)
    return tuple(topk_layout(q, bounds, table, budget)), tuple(streaming_layout(table, budget))


def test_selection_compiles_fullgraph_without_host_sync(generator):
    """torch.compile(fullgraph=True) refuses graph breaks, which any .item()/.tolist()/data-dependent shape would
    cause: selection is capturable. (backend="eager": trace only, so the test stays fast.)"""
    page_size, hkv, d = 4, 2, 8
    k_cache, _, layout = _dense_layout([30, 11], page_size, hkv, d, generator)
    summaries = PageKeySummaries()
    summaries.refresh(k_cache, *refresh_slots(layout.cols, layout.token_counts, page_size))
    q = torch.randn(2, 2 * hkv, d, generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(_selection_fn, fullgraph=True, backend="eager")
    args = (layout, q, summaries.bounds, 8, 4, 1, 1)
    for got, want in zip(compiled(*args), _selection_fn(*args)):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("query_len", [1, 3])
def test_budget_covering_context_equals_dense(generator, query_len):
    """Selecting every page (budget >= pages) through the per-head path gives the dense attention, whatever scores
    the pages (bounds or key signs)."""
    page_size, hkv, group, d = 4, 2, 2, 16
    lengths = [37, 5, 22]
    k_cache, v_cache, layout = _dense_layout(lengths, page_size, hkv, d, generator)
    max_pages = 10
    summaries = PageKeySummaries(keep_signs=True)
    summaries.refresh(k_cache, *refresh_slots(layout.cols, layout.token_counts, page_size))
    q = torch.randn(len(lengths) * query_len, hkv * group, d, generator=generator)
    q_indptr = torch.arange(0, (len(lengths) + 1) * query_len, query_len, dtype=torch.int32)
    dense = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr)
    for scoring in ("bounds", "signs"):
        cfg = SparseConfig(policy="topk", token_budget=max_pages * page_size, sink_tokens=0, recent_tokens=0,
                           scoring=scoring)
        step = StepSelection(cfg, layout, max_pages, query_len, page_size)
        sparse = step.layout_for(q, summaries)
        assert sparse.row_offsets.numel() == len(lengths) * hkv + 1
        out = fc.paged_attention(q, k_cache, v_cache, sparse, q_indptr, max_pages_per_seq=step.max_pages_per_row)
        torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-6)
    stream = StepSelection(SparseConfig(policy="streaming", token_budget=max_pages * page_size, sink_tokens=0,
                                        recent_tokens=0),
                           layout, max_pages, query_len, page_size).layout_for(q, None)
    torch.testing.assert_close(fc.paged_attention(q, k_cache, v_cache, stream, q_indptr), dense, atol=1e-6,
                               rtol=1e-6)


def test_topk_attention_matches_reference_on_selected_pages_and_finds_the_needle(generator):
    """A key planted on one page dominates the attention: topk with a small budget finds that page for the heads
    that look for it, and the output equals the float64 reference over exactly the selected pages."""
    page_size, hkv, group, d = 8, 2, 2, 32
    length = 200                                                             # 25 pages
    k_cache, v_cache, layout = _dense_layout([length], page_size, hkv, d, generator)
    k_cache *= 0.1
    q = torch.randn(1, hkv * group, d, generator=generator)
    needle_page = int(layout.cols[11])
    k_cache[needle_page, 3, 1] = q[0, 2] * (20 / (q[0, 2].square().sum() * d ** -0.5))  # score 20 for head 2
    summaries = PageKeySummaries()
    summaries.refresh(k_cache, *refresh_slots(layout.cols, layout.token_counts, page_size))
    cfg = SparseConfig(policy="topk", token_budget=4 * page_size, sink_tokens=1, recent_tokens=1)
    step = StepSelection(cfg, layout, 25, 1, page_size)
    sparse = step.layout_for(q, summaries)
    rows = _rows(sparse)
    assert needle_page in rows[1][0] and len(rows[1][0]) == 4
    assert int(layout.cols[0]) in rows[0][0] and int(layout.cols[24]) in rows[0][0]
    q_indptr = torch.tensor([0, 1], dtype=torch.int32)
    out = fc.paged_attention(q, k_cache, v_cache, sparse, q_indptr, max_pages_per_seq=4)
    ref, _ = reference_paged_attention(q, k_cache, v_cache, sparse.row_offsets, sparse.cols, sparse.token_counts,
                                       q_indptr)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    dense = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr)
    torch.testing.assert_close(out[:, 2], dense[:, 2], atol=1e-3, rtol=0)   # the needle dominates head 2


@pytest.mark.parametrize("batch, query_len", [(1, 1), (3, 1), (2, 3)])
def test_rerank_keeps_the_budget_with_the_best_exact_scores(generator, batch, query_len):
    """topk with rerank: of the bounds' rerank x budget candidates, the budget pages whose best key scores highest
    (max over the page's valid keys and the kv head's queries), sinks and recent pages always, in key order."""
    page_size, hkv, group, d = 8, 2, 3, 16
    lengths = [203, 150, 97][:batch]
    k_cache, v_cache, layout = _dense_layout(lengths, page_size, hkv, d, generator)
    q = torch.randn(batch * query_len, hkv * group, d, generator=generator)
    summaries = PageKeySummaries()
    summaries.refresh(k_cache, *refresh_slots(layout.cols, layout.token_counts, page_size))
    cfg = SparseConfig(policy="topk", token_budget=5 * page_size, sink_tokens=1, recent_tokens=page_size, rerank=3)
    step = StepSelection(cfg, layout, 32, query_len, page_size)
    budget, sinks, _ = cfg.page_counts(page_size)
    recent = max(1, (query_len + page_size - 2) // page_size + 1)
    candidates = select_pages(q, summaries.bounds, step.table.pages, step.table.counts, step.table.bias,
                              3 * budget, query_len, "max")[0]
    rows = _rows(step.layout_for(q, summaries, k_cache))
    offsets = layout.row_offsets.tolist()
    for b in range(batch):
        pages = layout.cols[offsets[b]:offsets[b + 1]].tolist()
        counts = layout.token_counts[offsets[b]:offsets[b + 1]].tolist()
        forced = set(pages[:sinks] + pages[-recent:])
        for h in range(hkv):
            qs = q[b * query_len:(b + 1) * query_len, h * group:(h + 1) * group].reshape(-1, d)
            exact = {p: (k_cache[p, :c, h] @ qs.T).max().item() for p, c in zip(pages, counts)}
            pool = [p for p in candidates[b, h].tolist() if p in exact]
            rest = sorted((p for p in pool if p not in forced), key=lambda p: -exact[p])
            expected = forced | set(rest[:budget - len(forced)])
            picked = rows[b * hkv + h][0]
            assert set(picked) == expected and picked == sorted(picked, key=pages.index), (b, h)


@pytest.mark.parametrize("query_len, dtype", [(1, torch.float32), (2, torch.bfloat16), (3, torch.float16)])
def test_candidate_page_scores_match_the_reference(generator, query_len, dtype):
    """The rerank stage's exact page scores: max over each candidate page's valid keys and the kv head's query
    heads, +inf for forced pages, -inf for padding entries (count 0) and page ids outside the pool; strided q."""
    batch, hkv, group, d, page_size, num_pages, candidates = 3, 2, 3, 20, 8, 30, 11
    k_pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype)
    wide = torch.randn(batch * query_len, hkv * group, 2 * d, generator=generator).to(dtype)
    q = wide[..., :d]
    cols = torch.randint(-2, num_pages + 3, (batch, hkv, candidates), generator=generator, dtype=torch.int32)
    counts = torch.randint(-1, page_size + 3, (batch, hkv, candidates), generator=generator, dtype=torch.int32)
    forced = torch.tensor([[cols[0, 0, 3].item(), -1], [cols[1, 1, 0].item(), cols[1, 0, 5].item()], [-1, -1]],
                          dtype=torch.int32)
    scores = candidate_page_scores(q, k_pool, cols, counts, forced, query_len)
    want = reference_candidate_scores(q, k_pool, cols, counts, forced)
    assert scores.dtype == torch.float32 and scores.shape == (batch, hkv, candidates)
    torch.testing.assert_close(scores.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.isinf(want).any() and torch.isfinite(want).any()


def test_candidate_page_scores_reject_bad_input():
    q, k_pool = torch.randn(2, 4, 8), torch.randn(10, 4, 2, 8)
    cols = torch.zeros(2, 2, 5, dtype=torch.int32)
    counts, forced = torch.ones_like(cols), torch.full((2, 1), -1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="k_cache must have q's dtype"):
        candidate_page_scores(q, k_pool.double(), cols, counts, forced)
    with pytest.raises(RuntimeError, match="cols must be"):
        candidate_page_scores(q, k_pool, cols[:, :1], counts[:, :1], forced)
    with pytest.raises(RuntimeError, match="counts must have cols' shape"):
        candidate_page_scores(q, k_pool, cols, counts[..., :4], forced)
    with pytest.raises(RuntimeError, match="forced_pages must be"):
        candidate_page_scores(q, k_pool, cols, counts, forced[:1])
    with pytest.raises(RuntimeError, match="contiguous int32"):
        candidate_page_scores(q, k_pool, cols.long(), counts, forced)
    with pytest.raises(RuntimeError, match=r"q.size\(0\)"):
        candidate_page_scores(q, k_pool, cols, counts, forced, query_len=2)


@pytest.mark.parametrize("shape, budget", [((3, 2, 11), 4), ((1, 8, 256), 64), ((5,), 1), ((2, 3, 7), 7),
                                           ((2, 1, 2, 9), 3)])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_select_candidate_pages_match_the_reference(generator, shape, budget, ties):
    """The rerank stage's pick: each row's budget best scores in IEEE total order (ties: the lower index), their
    cols / counts in candidate order, for any leading shape."""
    scores = tied_scores(shape, generator) if ties else torch.randn(shape, generator=generator)
    cols = torch.randint(-1, 1000, shape, generator=generator, dtype=torch.int32)
    counts = torch.randint(0, 65, shape, generator=generator, dtype=torch.int32)
    got = select_candidate_pages(scores, cols, counts, budget)
    want = reference_select_candidates(scores, cols, counts, budget)
    assert got[0].shape == got[1].shape == (*shape[:-1], budget) and got[0].dtype == torch.int32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_select_candidate_pages_reject_bad_input():
    scores = torch.randn(2, 2, 5)
    cols = torch.zeros(2, 2, 5, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="budget must be in"):
        select_candidate_pages(scores, cols, cols, 6)
    with pytest.raises(RuntimeError, match="budget must be in"):
        select_candidate_pages(scores, cols, cols, 0)
    with pytest.raises(RuntimeError, match="scores must be a contiguous float32"):
        select_candidate_pages(scores.double(), cols, cols, 2)
    with pytest.raises(RuntimeError, match="scores must be a contiguous float32"):
        select_candidate_pages(scores.transpose(0, 2), cols, cols, 2)
    with pytest.raises(RuntimeError, match="cols and counts must have scores' shape"):
        select_candidate_pages(scores, cols[..., :4], cols, 2)
    with pytest.raises(RuntimeError, match="contiguous int32"):
        select_candidate_pages(scores, cols.long(), cols.long(), 2)


def test_rerank_finds_the_needle_the_bounds_miss(generator):
    """Pages of many unrelated keys: their element-wise bounds are loose and all look alike, so the bounds alone
    pick the needle page no better than chance, while the exact scores of the candidates find it."""
    page_size, hkv, group, d = 16, 1, 1, 32
    length = 64 * page_size
    k_cache, v_cache, layout = _dense_layout([length], page_size, hkv, d, generator)
    q = torch.randn(1, 1, d, generator=generator)
    needle_page = int(layout.cols[40])
    k_cache[needle_page, 7, 0] = q[0, 0] * 2.0
    summaries = PageKeySummaries()
    summaries.refresh(k_cache, *refresh_slots(layout.cols, layout.token_counts, page_size))
    found = {}
    for rerank in (0, 64):
        cfg = SparseConfig(policy="topk", token_budget=4 * page_size, sink_tokens=1, recent_tokens=1, rerank=rerank)
        step = StepSelection(cfg, layout, 64, 1, page_size)
        found[rerank] = needle_page in _rows(step.layout_for(q, summaries, k_cache))[0][0]
    assert found[64]


# ---- PagedKVCache wiring (driven directly, no model) -------------------------------------------------------------

def _check_summaries(cache, layer_idx):
    """Every page of every row holds the min/max of its valid tokens in that layer's pool (and, with scoring
    "signs", their sign bits)."""
    layer = cache.layers[layer_idx]
    summaries = cache._sparse.summaries[layer_idx]
    bounds = summaries.bounds
    d = layer.pools.head_dim
    page_size = cache.page_size
    for row, length in enumerate(cache.sequence_lengths()):
        for j, page in enumerate(cache.page_table(row)):
            count = min(page_size, length - j * page_size)
            valid = layer.k_pool[page, :count]
            torch.testing.assert_close(bounds[page, :, :d], valid.amax(0), rtol=0, atol=0)
            torch.testing.assert_close(bounds[page, :, d:], valid.amin(0), rtol=0, atol=0)
            if summaries.signs is not None:
                assert torch.equal(unpack_signs(summaries.signs[page, :, :count], d), (valid > 0).transpose(0, 1))


@pytest.mark.parametrize("scoring", ["bounds", "signs"])
def test_cache_keeps_summaries_fresh_through_decode_beams_crop_and_reuse(generator, scoring):
    from transformers import Qwen2Config

    config = Qwen2Config(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         layer_types=["full_attention", "full_attention", "sliding_attention", "full_attention"],
                         use_sliding_window=True, sliding_window=8)
    sparse = SparseConfig(policy="topk", token_budget=16, sink_tokens=4, recent_tokens=4, dense_layers=1,
                          scoring=scoring)
    cache = fc.PagedKVCache(config, page_size=4, sparse=sparse)
    assert cache._sparse.sparse_layers == {1, 3}                   # layer 0 dense, layer 2 sliding
    hkv, d = 2, 8

    def step(batch, new):
        handles = []
        for layer in range(4):
            k = torch.randn(batch, hkv, new, d, generator=generator)
            handles.append(cache.update(k, torch.randn_like(k), layer)[0].resolve())
        return handles

    handles = step(2, 10)                                           # prefill: dense everywhere, summaries built
    assert not any(h.selector is not None for h in handles)
    _check_summaries(cache, 1)
    _check_summaries(cache, 3)
    for _ in range(6):                                              # up to 16 tokens: page bucket 4 <= budget 4
        handles = step(2, 1)
        assert not any(h.selector is not None for h in handles)
    handles = step(2, 1)                                            # 17 tokens: bucket 8 > 4, sparse layers select
    assert [h.selector is not None for h in handles] == [False, True, False, True]
    _check_summaries(cache, 1)
    cache.reorder_cache(torch.tensor([1, 1]))                       # beams share pages; next append copies on write
    step(2, 1)
    _check_summaries(cache, 3)
    cache.crop(-3)                                                  # drop tokens; the partial page is rewritten next
    step(2, 2)
    _check_summaries(cache, 1)
    cache.reset()                                                   # pages return to the pool and get reused
    step(3, 7)
    step(3, 1)
    _check_summaries(cache, 1)
    _check_summaries(cache, 3)


@pytest.mark.parametrize("scoring", ["bounds", "signs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crop_recomputes_the_summaries_of_the_pages_it_cuts(generator, scoring, dtype):
    """After a crop, a page left partly filled holds the summaries of its kept keys only (as if the removed ones had
    never been appended); a page other rows still share keeps bounds that cover every row's keys."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    sparse = SparseConfig(policy="topk", token_budget=8, sink_tokens=2, recent_tokens=2, dense_layers=0,
                          scoring=scoring)
    cache = fc.PagedKVCache(config, page_size=4, sparse=sparse)

    def step(batch, new):
        for layer in range(2):
            k = torch.randn(batch, 2, new, 8, generator=generator).to(dtype)
            cache.update(k, torch.randn_like(k), layer)[0].resolve()

    step(2, 9)
    for _ in range(4):                                              # decode steps fold keys into the bounds
        step(2, 1)
    for remove in (-2, -3, -1):                                     # 13 -> 11 (page 2 cut), 8 (page 2 freed), 7
        cache.crop(remove)
        _check_summaries(cache, 0)
        _check_summaries(cache, 1)
    step(2, 1)
    cache.reorder_cache(torch.tensor([0, 0]))                       # both rows share every page now
    shared_page = cache.page_table(0)[-1]
    before = cache._sparse.summaries[1].bounds[shared_page].clone()
    cache.crop(-1)
    assert torch.equal(cache._sparse.summaries[1].bounds[shared_page], before)   # shared: left covering
    valid = cache.layers[1].k_pool[shared_page, :3]
    bounds = cache._sparse.summaries[1].bounds[shared_page]
    assert (bounds[:, :8] >= valid.amax(0)).all() and (bounds[:, 8:] <= valid.amin(0)).all()


def test_cache_sparse_handle_attention_matches_selected_pages(generator):
    """The handle's selected layout fed to paged_attention equals attention over exactly those pages' keys."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    sparse = SparseConfig(policy="topk", token_budget=8, sink_tokens=2, recent_tokens=2, dense_layers=0)
    cache = fc.PagedKVCache(config, page_size=2, sparse=sparse)
    k = torch.randn(2, 2, 15, 8, generator=generator)
    cache.update(k, torch.randn_like(k), 0)
    k = torch.randn(2, 2, 1, 8, generator=generator)
    handle = cache.update(k, torch.randn_like(k), 0)[0].resolve()
    q = torch.randn(2, 4, 8, generator=generator)
    layout, max_pages = handle.selector.select(q), handle.selector.max_pages_per_row
    assert max_pages == 4 and layout.row_offsets.tolist() == [0, 4, 8, 12, 16]
    out = fc.paged_attention(q, handle.k_cache, handle.v_cache, layout, handle.q_indptr, max_pages_per_seq=max_pages)
    ref, _ = reference_paged_attention(q, handle.k_cache, handle.v_cache, layout.row_offsets, layout.cols,
                                       layout.token_counts, handle.q_indptr)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for row in range(4):                                             # sink page 0 and the newest page 8 are in
        cols = layout.cols[4 * row:4 * row + 4].tolist()
        table = cache.page_table(row // 2)
        assert table[0] in cols and table[-1] in cols


@pytest.mark.parametrize("scoring", ["bounds", "signs"])
def test_fixed_buffer_decode_step_selects_like_an_eager_step(generator, scoring):
    """A decode step whose metadata sits in fixed, capacity-padded buffers (what a CUDA-graph replay reads, see
    flashcore_hf/decode_graphs.py) refreshes and selects exactly like an eager step: same attention output."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    sparse = SparseConfig(policy="topk", token_budget=12, sink_tokens=2, recent_tokens=2, dense_layers=1,
                          scoring=scoring)
    eager, fixed = (fc.PagedKVCache(config, page_size=2, sparse=sparse) for _ in range(2))
    prompt = [torch.randn(3, 2, 21, 8, generator=generator) for _ in range(2)]
    for cache in (eager, fixed):
        for layer in range(2):
            cache.update(prompt[layer], prompt[layer] + 1, layer)[0].resolve()
    new = [torch.randn(3, 2, 1, 8, generator=generator) for _ in range(2)]
    eager_handles = [eager.update(new[layer], new[layer] + 1, layer)[0].resolve() for layer in range(2)]

    plan = fixed.plan_decode_step(torch.device("cpu"))
    shape = fixed.fixed_decode_shape(plan)                           # capacity-padded, as a captured step's buffers
    device_step = shape.split(shape.pack(*plan.host_parts, pin=False))
    fixed.begin_fixed_step(device_step, shape, plan)
    fixed_handles = [fixed.update(new[layer], new[layer] + 1, layer)[0].resolve() for layer in range(2)]
    fixed.finish_replayed_step(plan)

    q = torch.randn(3, 4, 8, generator=generator)
    for e, f in zip(eager_handles, fixed_handles):
        assert (e.selector is None) == (f.selector is None)
        layouts = [(h.layout, h.max_pages_per_seq) if h.selector is None else
                   (h.selector.select(q), h.selector.max_pages_per_row) for h in (e, f)]
        outs = [fc.paged_attention(q, h.k_cache, h.v_cache, layout, h.q_indptr, max_pages_per_seq=m)
                for h, (layout, m) in zip((e, f), layouts)]
        assert torch.equal(outs[0], outs[1])
    assert fixed_handles[1].selector is not None
    torch.testing.assert_close(fixed._sparse.summaries[1].bounds[1:], eager._sparse.summaries[1].bounds[1:],
                               rtol=0, atol=0)
    if scoring == "signs":
        _check_summaries(fixed, 1)


@pytest.mark.parametrize("scoring", ["bounds", "signs"])
def test_topk_decode_write_held_back_beside_selection(generator, monkeypatch, scoring):
    """On a "topk" decode step a sparse layer's K/V write is held back to run beside its page selection
    (cache.handles.LayerWrite): it runs exactly once, before anything reads the pools (k_cache, the cache's next
    operation), and selects the same pages and leaves the same K/V and summaries as writing first; dense layers and
    prefill steps write at once."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    sparse = SparseConfig(policy="topk", token_budget=8, sink_tokens=2, recent_tokens=2, dense_layers=1,
                          scoring=scoring)
    held, first = (fc.PagedKVCache(config, page_size=2, sparse=sparse) for _ in range(2))
    prompt = torch.randn(2, 2, 15, 8, generator=generator)
    for cache in (held, first):
        for layer in range(2):
            assert cache.update(prompt, prompt + 1, layer)[0].resolve().write is None     # prefill: at once
    writes = []
    summaries = held._sparse.summaries[1]
    fold = summaries.append_decode
    monkeypatch.setattr(summaries, "append_decode", lambda *args: writes.append(1) or fold(*args))
    q = torch.randn(2, 4, 8, generator=generator)
    for step in range(3):
        new = torch.randn(2, 2, 1, 8, generator=generator)
        steps = [[cache.update(new, new + 1, layer)[0].resolve() for cache in (held, first)] for layer in range(2)]
        assert steps[0][0].write is None                                                 # dense layer
        h, f = steps[1]
        assert h.write is not None and h.write.pending and len(writes) == step
        slot = held.sequence_lengths()[0] - 1 if step == 2 else None
        if step == 2:   # the cache's next operation wrote it (sequence_lengths flushes): nobody read the pools
            assert len(writes) == step + 1 and not h.write.pending
            page = held.page_table(0)[slot // 2]
            assert torch.equal(held.layers[1].k_pool[page, slot % 2], new[0, :, 0])
            continue
        layout = h.select_pages(q)
        assert len(writes) == step + 1 and not h.write.pending
        f.write.run()                                                                    # the order before
        expected = f.selector.select(q)
        assert torch.equal(layout.cols, expected.cols) and torch.equal(layout.token_counts, expected.token_counts)
        assert_same_stored_keys(held, first, 1)
        assert len(writes) == step + 1                                                   # once
    _check_summaries(held, 1)

