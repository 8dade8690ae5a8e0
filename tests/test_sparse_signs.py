"""CPU tests of "topk" with scoring="signs": the key sign bits (packing, refresh, decode updates, copy-on-write,
growth), the select_pages op's picks with signs against a float64 oracle computed from the keys, argument checks,
fixed shapes / fullgraph tracing, and that the signs find a needle in pages of many unrelated keys where the bounds
alone cannot."""
import pytest
import torch

import flashcore_hf as fc
from flashcore_hf.ops import append_kv, select_pages
from flashcore_hf.sparse import (
    PageKeySummaries,
    SparseConfig,
    StepSelection,
    padded_page_table,
    refresh_slots,
)
from flashcore_hf.sparse.summaries import pack_signs
from tests.capture_checks import HostDataLog
from tests.reference import random_paged_kv
from tests.sparse_reference import (
    append_pool_keys,
    assert_topk_picks,
    reference_sign_scores,
    unpack_signs,
)


def _paged(lengths, page_size, hkv, d, generator):
    """Random scattered pages: (k_cache, per-sequence PageLayout) and both summaries of every written page."""
    k_cache, _, row_offsets, cols, counts = random_paged_kv(lengths, page_size, hkv, d, generator=generator)
    layout = fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))
    summaries = PageKeySummaries(keep_signs=True)
    summaries.refresh(k_cache, *refresh_slots(cols, counts, page_size))
    return k_cache, layout, summaries


def _assert_signs_of_valid_keys(signs, k_pool, pages, counts):
    """signs[page, h, t] holds the sign bits of key t of the page for every valid token t."""
    d = k_pool.shape[-1]
    for page, count in zip(pages, counts):
        got = unpack_signs(signs[page, :, :count], d)                            # [Hkv, count, D]
        assert torch.equal(got, (k_pool[page, :count] > 0).transpose(0, 1)), (page, count)


def test_config_validates_scoring():
    assert SparseConfig().scoring == "bounds"
    with pytest.raises(ValueError, match="scoring"):
        SparseConfig(policy="topk", scoring="quest")


@pytest.mark.parametrize("d", [8, 13, 64, 128])
def test_pack_unpack_round_trip(generator, d):
    keys = torch.randn(3, 5, d, generator=generator)
    keys[0, 0, :3] = 0.0                                                          # zero is not positive
    packed = pack_signs(keys)
    assert packed.shape == (3, 5, -(-d // 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_signs(packed, d), keys > 0)
    assert int(pack_signs(torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0]))[0]) == 0b10000101


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signs_follow_refresh_decode_updates_copies_and_growth(generator, dtype):
    """Decode updates (one key per row, rows without a key included) build the same bits a refresh writes; a
    reused page gets its new keys' bits; copy-on-write copies them; pool growth keeps them."""
    page_size, hkv, d, num_pages = 4, 2, 12, 5
    pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype)
    incremental, full = PageKeySummaries(keep_signs=True), PageKeySummaries(keep_signs=True)
    incremental.refresh(pool, *refresh_slots(torch.tensor([3]), torch.tensor([4]), page_size))
    pool[3] = torch.randn(page_size, hkv, d, generator=generator).to(dtype)     # page 3 reused
    for offset in range(page_size):
        slots = torch.tensor([-1, 3 * page_size + offset, -1, 1 * page_size + offset], dtype=torch.int32)
        append_pool_keys(incremental, pool, slots)
        full.refresh(pool, *refresh_slots(torch.tensor([3, 1]), torch.tensor([offset + 1] * 2), page_size))
        _assert_signs_of_valid_keys(incremental.signs, pool, [3, 1], [offset + 1] * 2)
        assert torch.equal(incremental.signs[[1, 3], :, :offset + 1], full.signs[[1, 3], :, :offset + 1])
    before = incremental.signs.clone()
    append_pool_keys(incremental, pool, torch.tensor([-1, -1], dtype=torch.int32))   # no row writes: nothing changes
    _assert_signs_of_valid_keys(incremental.signs, pool, [3, 1], [page_size] * 2)
    assert torch.equal(incremental.signs[[1, 3]], before[[1, 3]])
    incremental.copy_pages(pool, torch.tensor([3]), torch.tensor([0]))
    assert torch.equal(incremental.signs[0], incremental.signs[3])
    grown = torch.cat([pool, torch.randn(3, page_size, hkv, d, generator=generator).to(dtype)])
    append_pool_keys(incremental, grown, torch.tensor([6 * page_size], dtype=torch.int32))
    assert incremental.signs.shape == (8, hkv, page_size, 2)
    _assert_signs_of_valid_keys(incremental.signs, grown, [3, 1, 6], [page_size, page_size, 1])


@pytest.mark.parametrize("d", [16, 20, 64])
def test_append_kv_writes_the_new_keys_sign_bits(generator, d):
    """append_kv with key signs writes each new key's sign bits (padding bits zero) and nothing else: the slots of
    rows without a key (< 0) and every other token keep their bytes."""
    num_pages, page_size, hkv = 6, 4, 3
    pool = torch.randn(num_pages, page_size, hkv, d, generator=generator)
    bounds = torch.zeros(num_pages, hkv, 2 * d)
    signs = torch.randint(0, 256, (num_pages, hkv, page_size, -(-d // 8)), generator=generator, dtype=torch.uint8)
    want = signs.clone()
    slots = torch.tensor([2 * page_size + 3, -1, 5 * page_size], dtype=torch.int32)
    keys = pool.view(-1, hkv, d)[slots.clamp(min=0).long()]
    append_kv(pool, torch.empty_like(pool), keys, keys, slots, key_bounds=bounds, key_signs=signs)
    for slot in (2 * page_size + 3, 5 * page_size):
        page, offset = divmod(slot, page_size)
        want[page, :, offset] = pack_signs(pool[page, offset])
    assert torch.equal(signs, want)


def test_append_kv_rejects_bad_signs():
    bounds, pool, v_pool = torch.zeros(4, 2, 32), torch.randn(4, 3, 2, 16), torch.zeros(4, 3, 2, 16)
    before = pool.clone()
    signs = torch.zeros(4, 2, 3, 2, dtype=torch.uint8)
    k = torch.randn(1, 2, 16)

    def append(signs_):
        append_kv(pool, v_pool, k, k, torch.tensor([0]), key_bounds=bounds, key_signs=signs_)

    with pytest.raises(RuntimeError, match="signs must be"):
        append(signs[..., :1].contiguous())                                # 1 byte for 16 channels
    with pytest.raises(RuntimeError, match="signs must be"):
        append(signs[:, :, :2].contiguous())                               # page_size 2, pool 3
    with pytest.raises(RuntimeError, match="uint8"):
        append(signs.to(torch.int32))
    assert not bounds.any() and not signs.any() and torch.equal(pool, before)   # nothing written by a rejected call


@pytest.mark.parametrize("query_len, reduction, q_dtype", [(1, "max", torch.float32), (1, "sum", torch.float32),
                                                     (3, "max", torch.bfloat16), (2, "sum", torch.float16)])
def test_select_pages_with_signs_is_a_top_k_of_the_oracle(generator, query_len, reduction, q_dtype):
    """The select_pages op with signs picks a top-k of the float64 oracle's scores (computed from the keys, not
    their bits), sinks / recent pages forced, padding last, in key order; odd head dim and partial pages."""
    page_size, hkv, group, d = 8, 2, 3, 20
    k_cache, layout, summaries = _paged([203, 150, 9], page_size, hkv, d, generator)
    table = padded_page_table(layout, 32, 1, 2)
    q = torch.randn(3 * query_len, hkv * group, d, generator=generator).to(q_dtype)
    want = reference_sign_scores(q, k_cache, summaries.bounds, table, query_len, reduction)
    for budget in (1, 6, 32):
        cols, counts = select_pages(q, summaries.bounds, table.pages, table.counts, table.bias, budget, query_len,
                                    reduction, summaries.signs)
        assert_topk_picks(cols, counts, want, table, budget, atol=1e-4)


def test_select_pages_rejects_bad_signs(generator):
    _, layout, summaries = _paged([40], 8, 2, 16, generator)
    table = padded_page_table(layout, 5, 1, 1)
    q = torch.randn(1, 4, 16, generator=generator)
    args = (q, summaries.bounds, table.pages, table.counts, table.bias, 2)
    with pytest.raises(RuntimeError, match="signs must be"):
        select_pages(*args, signs=summaries.signs[..., :1].contiguous())              # 1 byte for 16 channels
    with pytest.raises(RuntimeError, match="uint8"):
        select_pages(*args, signs=summaries.signs.to(torch.int32))


def test_selection_with_signs_and_rerank_keeps_forced_pages_in_key_order(generator):
    page_size, hkv, group, d = 8, 2, 2, 16
    k_cache, layout, summaries = _paged([203, 90], page_size, hkv, d, generator)
    q = torch.randn(2, hkv * group, d, generator=generator)
    for rerank in (0, 2):
        cfg = SparseConfig(policy="topk", token_budget=5 * page_size, sink_tokens=1, recent_tokens=page_size,
                           rerank=rerank, scoring="signs")
        step = StepSelection(cfg, layout, 32, 1, page_size)
        sparse = step.layout_for(q, summaries, k_cache)
        offsets = layout.row_offsets.tolist()
        for row in range(2 * hkv):
            b = row // hkv
            pages = layout.cols[offsets[b]:offsets[b + 1]].tolist()
            picked = [p for p, c in zip(sparse.cols[5 * row:5 * row + 5].tolist(),
                                        sparse.token_counts[5 * row:5 * row + 5].tolist()) if c > 0]
            assert len(picked) == 5 and pages[0] in picked and pages[-1] in picked, (rerank, row)
            assert picked == sorted(picked, key=pages.index)


def test_signs_find_the_needle_the_bounds_miss(generator):
    """Pages of 16 unrelated keys: the element-wise bounds of every page look alike, so Quest picks the needle's
    page about as often as chance; its sign pattern matches the query's, which the signs' estimate sees."""
    page_size, hkv, d, pages_per_seq, trials = 16, 1, 32, 64, 8
    found = {"bounds": 0, "signs": 0}
    for _ in range(trials):
        k_cache, layout, summaries = _paged([pages_per_seq * page_size], page_size, hkv, d, generator)
        q = torch.randn(1, 1, d, generator=generator)
        needle_page = int(layout.cols[40])
        k_cache[needle_page, 7, 0] = q[0, 0] * 0.5
        summaries.refresh(k_cache, *refresh_slots(layout.cols, layout.token_counts, page_size))
        for scoring in found:
            cfg = SparseConfig(policy="topk", token_budget=4 * page_size, sink_tokens=1, recent_tokens=1,
                               scoring=scoring)
            sparse = StepSelection(cfg, layout, pages_per_seq, 1, page_size).layout_for(q, summaries)
            found[scoring] += needle_page in sparse.cols.tolist()
    assert found["signs"] == trials and found["bounds"] < trials, found


def _signs_selection(layout, q, bounds, signs, max_pages, budget):
    table = padded_page_table(layout, max_pages, 1, 1)
    return select_pages(q, bounds, table.pages, table.counts, table.bias, budget, signs=signs)


def test_signs_selection_compiles_fullgraph_without_host_sync(generator):
    page_size, hkv, d = 4, 2, 8
    _, layout, summaries = _paged([30, 11], page_size, hkv, d, generator)
    q = torch.randn(2, 2 * hkv, d, generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(_signs_selection, fullgraph=True, backend="eager")
    args = (layout, q, summaries.bounds, summaries.signs, 8, 4)
    for got, want in zip(compiled(*args), _signs_selection(*args)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("scoring", ["bounds", "signs"])
@pytest.mark.parametrize("rerank", [0, 2])
def test_summary_update_and_selection_need_no_host_data(generator, scoring, rerank):
    """What a captured decode step runs for "topk" (the decode update of the summaries, the step's page table, the
    selection) reads no device value back and brings no host data in. (The first version of the signs' update read
    the first written slot back with a 0-dim index: a sync, which a graph capture refuses.)"""
    page_size, hkv, d = 4, 2, 16
    k_cache, layout, summaries = _paged([37, 20], page_size, hkv, d, generator)
    q = torch.randn(2, 2 * hkv, d, generator=generator)
    slots = torch.tensor([-1, int(layout.cols[3]) * page_size + 2], dtype=torch.int32)
    cfg = SparseConfig(policy="topk", token_budget=3 * page_size, sink_tokens=1, recent_tokens=1, rerank=rerank,
                       scoring=scoring)
    with HostDataLog() as log:
        append_pool_keys(summaries, k_cache, slots)
        StepSelection(cfg, layout, 16, 1, page_size).layout_for(q, summaries, k_cache)
    assert log.hits == []
