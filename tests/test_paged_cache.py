"""PagedKVCache driven directly (no model) against transformers' DynamicCache.

Every step feeds the same random K/V to both caches. Checks, per layer and step: the K/V each sequence reads through
the returned handle's layout equal DynamicCache's unpadded K/V exactly; `paged_attention` over the handle matches the
float64 reference (tests/reference.py) computed on DynamicCache's unpadded K/V; HF bookkeeping (seq length, mask
sizes, query offset) matches DynamicCache. Scenarios: left padding, beams (reorder_cache, copy-on-write), crop,
batch_repeat_interleave / batch_select_indices, page sizes 1/4/16 with page boundaries crossed, fixed budgets running
out (and recovering), growth without copying.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from packaging import version
from transformers import DynamicCache, LlamaConfig

from flashcore_hf.cache import OutOfPagesError, PagedKVCache, page_count_bucket
from flashcore_hf.cache.pools import LayerPools
from flashcore_hf.cache.step_plan import build_layouts, query_runs
from flashcore_hf.growable import GrowableBuffer
from flashcore_hf.ops import build_layout, paged_attention
from tests.reference import gather_sequence_kv, reference_paged_attention

NUM_LAYERS, HQ, HKV, HEAD_DIM = 3, 4, 2, 12


def make_config(num_layers=NUM_LAYERS, **kw):
    return LlamaConfig(num_hidden_layers=num_layers, num_attention_heads=HQ, num_key_value_heads=HKV,
                       hidden_size=HQ * HEAD_DIM, head_dim=HEAD_DIM, **kw)


def growable_pools_available() -> bool:
    try:
        GrowableBuffer("cpu", 1 << 20)
    except RuntimeError:
        return False
    return True


class Twin:
    """A PagedKVCache and a DynamicCache fed the same updates, with the padding mask [B, padded length]."""

    def __init__(self, page_size, num_pages=None, batch_size=3, mask_via="argument", layers=None, **kw):
        self.config = make_config()
        self.paged = PagedKVCache(self.config, page_size=page_size, num_pages=num_pages, **kw)
        self.dense = DynamicCache(config=self.config)
        self.batch_size = batch_size
        self.mask = torch.ones(batch_size, 0, dtype=torch.int64)
        self.mask_via = mask_via
        self.layers = list(range(NUM_LAYERS)) if layers is None else layers

    def step(self, new_mask: torch.Tensor):
        """One forward step of S = new_mask.shape[1] tokens (new_mask [B, S], 0 = left padding); checks every layer."""
        b, s = new_mask.shape
        assert b == self.batch_size
        past = self.dense.get_seq_length(self.layers[0])
        assert self.paged.get_seq_length(self.layers[0]) == past
        assert self.paged.get_mask_sizes(s, self.layers[0]) == self.dense.get_mask_sizes(s, self.layers[0])
        assert self.paged.get_query_offset(self.layers[0]) == self.dense.get_query_offset(self.layers[0])
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        for layer in self.layers:
            k, v = (torch.randn(b, HKV, s, HEAD_DIM) for _ in range(2))
            q = torch.randn(b, HQ, s, HEAD_DIM)
            if self.mask_via == "argument":
                handle, handle_v = self.paged.update(k, v, layer, attention_mask=self.mask)
            elif self.mask_via == "new_columns":
                handle, handle_v = self.paged.update(k, v, layer, attention_mask=new_mask)
            else:  # what the flashcore attention function does: resolve update()'s handle with the forward's mask
                pending, pending_v = self.paged.update(k, v, layer)
                assert pending is pending_v
                handle = handle_v = pending.resolve(None if bool(self.mask.all()) else self.mask)
            assert handle is handle_v
            dense_k, dense_v = self.dense.update(k, v, layer)
            self.check_layer(handle, dense_k, dense_v, q, new_mask)

    def check_layer(self, handle, dense_k, dense_v, q, new_mask):
        b, _, s, d = q.shape
        layout = handle.layout
        assert handle.max_q_len == s
        assert torch.equal(handle.q_indptr, torch.arange(b + 1, dtype=torch.int32) * s)
        pages_per_row = (layout.row_offsets[1:] - layout.row_offsets[:-1]).tolist()
        # a power-of-two upper bound, so eager steps and CUDA-graph replays run the same kernel plan
        assert handle.max_pages_per_seq == page_count_bucket(max(pages_per_row))
        assert handle.max_pages_per_seq >= max(pages_per_row)
        assert torch.equal(layout.staging_ids, torch.full_like(layout.cols, -1))
        valid = self.mask.bool()
        keys, values = [], []
        for row in range(b):
            k_row = dense_k[row][:, valid[row]].transpose(0, 1).double()   # [n_k, Hkv, D]
            v_row = dense_v[row][:, valid[row]].transpose(0, 1).double()
            got_k, got_v = gather_sequence_kv(handle.k_cache, handle.v_cache, layout.row_offsets, layout.cols,
                                              layout.token_counts, row)
            assert torch.equal(got_k, k_row) and torch.equal(got_v, v_row), f"row {row}: paged K/V differ"
            keys.append(k_row)
            values.append(v_row)
        assert self.paged.sequence_lengths() == [k.shape[0] for k in keys]

        q_packed = q.transpose(1, 2).reshape(b * s, HQ, d)
        out = paged_attention(q_packed, handle.k_cache, handle.v_cache, layout, handle.q_indptr,
                              max_q_len=handle.max_q_len, max_pages_per_seq=handle.max_pages_per_seq)
        # Float64 reference over DynamicCache's unpadded K/V: one "page" per row holding the row's real keys, and
        # only the real (unpadded) queries, which are the last ones of each row.
        n_max = max(1, max(k.shape[0] for k in keys))
        dense_pages_k = torch.zeros(b, n_max, HKV, d, dtype=torch.float64)
        dense_pages_v = torch.zeros_like(dense_pages_k)
        for row in range(b):
            dense_pages_k[row, :keys[row].shape[0]] = keys[row]
            dense_pages_v[row, :values[row].shape[0]] = values[row]
        real = new_mask.bool().flatten()
        counts = new_mask.sum(dim=1)
        q_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)
        as_i32 = lambda x: torch.as_tensor(x, dtype=torch.int32)  # noqa: E731
        expected, _ = reference_paged_attention(
            q_packed[real].double(), dense_pages_k, dense_pages_v, as_i32(list(range(b + 1))), as_i32(list(range(b))),
            as_i32([k.shape[0] for k in keys]), q_indptr)
        torch.testing.assert_close(out[real].double(), expected, rtol=1e-5, atol=1e-5)
        # Padding queries sit before every key (bottom-right alignment), so they see nothing and come out as zeros.
        assert torch.count_nonzero(out[~real]) == 0

    def reorder(self, beam_idx):
        beam_idx = torch.as_tensor(beam_idx)
        self.paged.reorder_cache(beam_idx)
        self.dense.reorder_cache(beam_idx)
        self.mask = self.mask[beam_idx]

    def crop(self, n):
        self.paged.crop(-n)
        self.dense.crop(-n)
        self.mask = self.mask[:, :max(0, self.mask.shape[1] - n)]

    def select(self, indices):
        indices = torch.as_tensor(indices)
        self.paged.batch_select_indices(indices)
        self.dense.batch_select_indices(indices)
        self.mask = self.mask[indices]
        self.batch_size = self.mask.shape[0]

    def repeat(self, repeats):
        self.paged.batch_repeat_interleave(repeats)
        self.dense.batch_repeat_interleave(repeats)
        self.mask = self.mask.repeat_interleave(repeats, dim=0)
        self.batch_size *= repeats


def left_padded(lengths, width):
    """[B, width] mask with lengths[b] ones at the end of row b."""
    return torch.stack([torch.arange(width) >= width - n for n in lengths]).to(torch.int64)


def ones(batch_size, s=1):
    return torch.ones(batch_size, s, dtype=torch.int64)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("mask_via", ["argument", "new_columns", "resolve"])
def test_matches_dynamic_cache_with_left_padding(page_size, mask_via):
    twin = Twin(page_size, mask_via=mask_via)
    twin.step(left_padded([7, 3, 0], 7))          # prefill; the last row is all padding so far
    for _ in range(5):
        twin.step(ones(3))
    twin.step(left_padded([3, 3, 3], 3))          # a multi-token step after decode (e.g. a verified draft)
    assert twin.paged.sequence_lengths() == [15, 11, 8]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_beams_share_pages_and_copy_on_write(page_size):
    twin = Twin(page_size, batch_size=4)
    twin.step(left_padded([6, 6, 2, 5], 6))
    used_before = twin.paged.stats().pages_used
    twin.reorder([1, 1, 0, 3])                    # row 2 dropped; rows 0 and 1 share all of old row 1's pages
    stats = twin.paged.stats()
    assert stats.pages_shared == -(-6 // page_size) and stats.pages_used < used_before
    for beam_idx in ([0, 1, 1, 2], [3, 3, 3, 3], [2, 0, 1, 3], [0, 1, 2, 3]):
        twin.step(ones(4))
        twin.reorder(beam_idx)
    for _ in range(page_size + 1):                 # crosses a page boundary with every row
        twin.step(ones(4))
    twin.reorder([1, 0, 0, 1])
    twin.step(ones(4, 2))


def test_copy_on_write_never_writes_a_shared_page():
    """Beam 0's pages must read back unchanged after beam 1, forked from it, appends."""
    twin = Twin(4, batch_size=2)
    twin.step(ones(2, 6))
    twin.reorder([0, 0])
    shared = twin.paged.page_table(0)
    assert twin.paged.page_table(1) == shared
    twin.step(ones(2))                             # both rows append to the shared, partly filled page 2 of 2
    tables = [twin.paged.page_table(0), twin.paged.page_table(1)]
    assert tables[0][0] == tables[1][0] == shared[0]
    assert tables[0][1] != tables[1][1]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_crop(page_size):
    twin = Twin(page_size)
    twin.step(left_padded([9, 4, 2], 9))
    twin.step(ones(3))
    twin.crop(3)                                   # row 2 (2 real tokens + 1 decoded) keeps none
    assert twin.paged.sequence_lengths() == [7, 2, 0]
    assert twin.paged.get_seq_length() == twin.dense.get_seq_length() == 7
    twin.step(ones(3, 2))
    twin.reorder([0, 0, 1])
    twin.crop(1)
    twin.step(ones(3))
    twin.crop(0)
    twin.step(ones(3))
    twin.crop(100)                                 # more than stored: empty, like DynamicCache
    assert twin.paged.sequence_lengths() == [0, 0, 0] and twin.paged.stats().pages_used == 0
    twin.step(left_padded([2, 1, 2], 2))


def test_crop_positive_argument_follows_installed_transformers():
    cache = PagedKVCache(make_config(), page_size=4, num_pages=16)
    for layer in range(NUM_LAYERS):
        cache.update(torch.randn(1, HKV, 6, HEAD_DIM), torch.randn(1, HKV, 6, HEAD_DIM), layer)
    if version.parse(transformers.__version__).release < (5, 18):
        cache.crop(4)                              # deprecated meaning: keep 4 tokens
        assert cache.get_seq_length() == 4 and cache.sequence_lengths() == [4]
    else:
        with pytest.raises(ValueError, match="positive"):
            cache.crop(4)
        assert cache.get_seq_length() == 6


def test_batch_repeat_interleave_and_select_indices():
    twin = Twin(4, batch_size=2)
    twin.step(left_padded([5, 3], 5))
    twin.repeat(2)                                 # 4 rows, pairs share pages
    assert twin.paged.stats().pages_shared == 2 + 1
    twin.step(ones(4))
    twin.select([3, 0])
    twin.step(ones(2, 3))
    twin.select(torch.tensor([True, False]))
    twin.step(ones(1))


def test_subset_of_layers_plans_once_per_step():
    """Updates of only some layers (first one != 0): a step starts at the first layer of the previous step."""
    twin = Twin(4, batch_size=2, layers=[1, 2])
    twin.step(left_padded([4, 2], 4))
    twin.step(ones(2))
    twin.step(ones(2))
    assert twin.paged.sequence_lengths() == [6, 4]
    assert twin.paged.layers[0].k_pool is None     # layer 0 never saw K/V


def test_layout_equals_build_layout():
    """The O(pages) layout from the page tables is what build_layout gives for the per-token page ids."""
    twin = Twin(4, batch_size=3)
    twin.step(left_padded([9, 5, 0], 9))
    twin.reorder([0, 0, 1])
    twin.step(ones(3))
    cache = twin.paged
    lengths = cache.sequence_lengths()
    runs = query_runs([n - 1 for n in lengths], None, 1)              # every stored token is a key of the run
    layouts, largest = build_layouts(runs, [cache.page_table(r) for r in range(3)], cache.page_size, window=None)
    layout, max_pages = layouts["full"], largest["full"]
    token_to_page, starts, ends = [], [], []
    for row, n in enumerate(cache.sequence_lengths()):
        pages = cache.page_table(row)
        starts.append(len(token_to_page))
        token_to_page += [pages[i // cache.page_size] for i in range(n)]
        ends.append(len(token_to_page))
    num_pages = cache.allocator.num_pages
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    expected = build_layout(i32(token_to_page), i32(starts), i32(ends), torch.ones(num_pages, dtype=torch.bool),
                            page_tokens=cache.page_size, num_pages=num_pages)
    for got, want in zip(layout, expected):
        assert torch.equal(got, want)
    assert max_pages == 3


def test_out_of_pages_fixed_budget_and_recovery():
    twin = Twin(4, num_pages=6, batch_size=2)
    twin.step(left_padded([8, 3], 8))              # 2 + 1 pages
    cache = twin.paged
    pools = [(layer.k_pool.clone(), layer.v_pool.clone()) for layer in cache.layers]
    before = (cache.get_seq_length(), cache.sequence_lengths(), cache.stats(), cache.page_table(0))
    k = torch.randn(2, HKV, 9, HEAD_DIM)
    with pytest.raises(OutOfPagesError) as info:
        cache.update(k, k, 0)[0].resolve()         # needs 3 + 2 more pages, 3 are free
    err = info.value
    assert isinstance(err, RuntimeError)
    assert "page" in str(err) and "needs 5 free page(s)" in str(err) and "only 3 of the cache's 6" in str(err)
    assert (err.needed, err.available) == (5, 3)
    assert (cache.get_seq_length(), cache.sequence_lengths(), cache.stats(), cache.page_table(0)) == before
    bits = lambda t: t.view(torch.int32)  # noqa: E731  (bitwise: unwritten pool memory may hold NaNs)
    for layer, (k_pool, v_pool) in zip(cache.layers, pools):
        assert torch.equal(bits(layer.k_pool), bits(k_pool)) and torch.equal(bits(layer.v_pool), bits(v_pool)), \
            "nothing may be written"
    # Still usable: decode fits; crop frees pages for a longer step; reset frees everything.
    twin.step(ones(2))
    twin.crop(5)
    twin.step(ones(2, 4))
    cache.reset()
    assert cache.stats().pages_used == 0 and cache.get_seq_length() == 0
    twin = Twin(4, num_pages=6, batch_size=1)
    twin.paged = cache
    twin.step(ones(1, 24))                         # all 6 pages
    with pytest.raises(OutOfPagesError, match="page"):
        cache.update(torch.randn(1, HKV, 1, HEAD_DIM), torch.randn(1, HKV, 1, HEAD_DIM), 0)[0].resolve()


def test_hf_bookkeeping_and_properties():
    cache = PagedKVCache(make_config(), page_size=16, num_pages=8)
    assert cache.get_seq_length() == 0 and cache.get_mask_sizes(5, 0) == (5, 0)
    assert cache.is_compileable is False
    assert cache.is_sliding == cache.is_linear == cache.is_dummy == [False] * NUM_LAYERS
    assert cache.batch_size == -1 and len(cache) == NUM_LAYERS
    assert cache.get_max_length() == -1
    stats = cache.stats()
    assert (stats.pages_total, stats.pages_free, stats.bytes_total) == (8, 8, 0)
    k = torch.randn(2, HKV, 20, HEAD_DIM)
    for layer in range(NUM_LAYERS):
        cache.update(k, k, layer)
    stats = cache.stats()
    page_bytes = NUM_LAYERS * 2 * 16 * HKV * HEAD_DIM * 4
    assert (stats.pages_used, stats.pages_free, stats.pages_shared) == (4, 4, 0)
    assert (stats.bytes_total, stats.bytes_used) == (8 * page_bytes, 4 * page_bytes)
    assert "4/8 pages used" in str(stats) and cache.batch_size == 2


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="layer types"):
        PagedKVCache(make_config(layer_types=["full_attention", "linear_attention", "full_attention"]))
    cache = PagedKVCache(make_config(), page_size=4, num_pages=8)
    k = torch.randn(2, HKV, 3, HEAD_DIM)
    for bad in (torch.ones(2, 2), torch.ones(3, 3), torch.ones(2)):
        with pytest.raises(ValueError, match="attention_mask must be"):
            cache.update(k, k, 0, attention_mask=bad)
    cache.update(k, k, 0, attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="planned for"):
        cache.update(torch.randn(2, HKV, 1, HEAD_DIM), torch.randn(2, HKV, 1, HEAD_DIM), 1)[0].resolve()
    cache.update(k, k, 1)[0].resolve()
    with pytest.raises(ValueError, match="batch of 3"):
        cache.update(torch.randn(3, HKV, 1, HEAD_DIM), torch.randn(3, HKV, 1, HEAD_DIM), 0)[0].resolve()
    with pytest.raises(IndexError):
        cache.reorder_cache(torch.tensor([0, 2]))
    assert cache.sequence_lengths() == [0, 3] and cache.get_seq_length() == 3


@pytest.mark.skipif(not growable_pools_available(), reason="extension built without GrowableBuffer")
def test_growable_pools_grow_without_copying():
    twin = Twin(4, batch_size=2)                  # num_pages=None
    twin.step(left_padded([5, 3], 5))
    cache = twin.paged
    first = cache.stats().pages_total
    pointers = [(layer.k_pool.data_ptr(), layer.v_pool.data_ptr()) for layer in cache.layers]
    assert first == 3                              # 2 + 1 pages of 4 tokens: the prompt maps exactly that
    growths, last = 0, first
    while growths < 3:                             # grows several times; every step re-checks all old K/V
        twin.step(ones(2, 150))
        growths += cache.stats().pages_total > last
        last = cache.stats().pages_total
    assert [(layer.k_pool.data_ptr(), layer.v_pool.data_ptr()) for layer in cache.layers] == pointers
    assert all(layer.k_pool.shape[0] == cache.stats().pages_total for layer in cache.layers)


@pytest.mark.skipif(not growable_pools_available(), reason="extension built without GrowableBuffer")
def test_growable_pools_respect_max_num_pages():
    twin = Twin(4, batch_size=1, max_num_pages=5)
    twin.step(ones(1, 12))
    with pytest.raises(OutOfPagesError, match="grow to at most 5 pages"):
        twin.paged.update(torch.randn(1, HKV, 9, HEAD_DIM), torch.randn(1, HKV, 9, HEAD_DIM), 0)[0].resolve()
    assert twin.paged.sequence_lengths() == [12]
    twin.step(ones(1, 8))                          # exactly fills the 5 pages
    assert twin.paged.stats().pages_free == 0


@pytest.mark.skipif(not growable_pools_available(), reason="extension built without GrowableBuffer")
def test_growth_failure_is_out_of_pages(monkeypatch):
    """When mapping more memory fails, the step raises OutOfPagesError and the cache stays as it was."""
    twin = Twin(4, batch_size=1)
    twin.step(ones(1, 10))
    cache = twin.paged
    before = (cache.stats(), cache.sequence_lengths(), cache.get_seq_length())

    def refuse(layer, num_pages):
        raise RuntimeError("cuMemCreate: out of memory")

    monkeypatch.setattr(LayerPools, "grow", refuse)
    k = torch.randn(1, HKV, 4 * cache.stats().pages_total, HEAD_DIM)
    with pytest.raises(OutOfPagesError, match="mapping memory .* failed: cuMemCreate"):
        cache.update(k, k, 0)[0].resolve()
    assert (cache.stats(), cache.sequence_lengths(), cache.get_seq_length()) == before
    monkeypatch.undo()
    twin.step(ones(1, 4 * cache.stats().pages_total))


def masked_causal_reference(q, keys, values, mask):
    """Float64 attention of every query column over the real keys at columns <= it (eager attention with a 2-D
    padding mask): q [B, Hq, S, D], keys/values [B, Hkv, M, D] over the M columns of mask [B, M] (the queries are
    its last S columns). Columns that see no key give zeros."""
    b, hq, s, d = q.shape
    group = hq // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * d ** -0.5
    m = mask.shape[1]
    cols = torch.arange(m)
    visible = mask.bool()[:, None, None, :] & (cols[None, None, None, :] <= (cols[m - s:])[None, None, :, None])
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_right_padding_and_holes_match_masked_attention(page_size):
    """Any 2-D mask (right padding, holes, rows that are all padding so far): padding tokens take no slot and every
    query column, padding ones included, attends to the real keys at columns <= it, as eager attention does."""
    cache = PagedKVCache(make_config(), page_size=page_size)
    generator = torch.Generator().manual_seed(7)
    keys = values = None
    mask = torch.zeros(3, 0, dtype=torch.int64)
    steps = [torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0]]),   # right, holes, empty
             torch.tensor([[1], [1], [1]]), torch.tensor([[0, 1], [1, 0], [1, 1]]), torch.tensor([[1], [0], [1]])]
    for new in steps:
        b, s = new.shape
        mask = torch.cat([mask, new], dim=1)
        for layer in range(NUM_LAYERS):
            k, v = (torch.randn(b, HKV, s, HEAD_DIM, generator=generator) for _ in range(2))
            q = torch.randn(b, HQ, s, HEAD_DIM, generator=generator)
            step = cache.update(k, v, layer)[0].resolve(mask)
            if layer == 0:                         # every layer plans the same way; check the first
                keys = k if keys is None else torch.cat([keys, k], dim=2)
                values = v if values is None else torch.cat([values, v], dim=2)
                q_packed = q.transpose(1, 2).reshape(b * s, HQ, HEAD_DIM)
                out = paged_attention(q_packed, step.k_cache, step.v_cache, step.layout, step.q_indptr)
                expected = masked_causal_reference(q, keys, values, mask)
                torch.testing.assert_close(out.view(b, s, HQ, HEAD_DIM).transpose(1, 2).double(), expected,
                                           rtol=1e-5, atol=1e-5)
        assert cache.sequence_lengths() == mask.sum(dim=1).tolist()
        assert cache.get_seq_length() == mask.shape[1]
    cache.crop(-2)                                 # the last two columns: row 1 loses one real token, rows 0/2 two
    assert cache.sequence_lengths() == mask[:, :-2].sum(dim=1).tolist()


def test_pool_arena_next_tenant_reuses_the_mapped_memory(monkeypatch):
    """A pool arena's next cache maps nothing again when it needs about as much as the previous one (same addresses,
    nothing released), reads back exactly what it stored over the old contents, and a much smaller cache gets the
    old memory released first (it never holds more than twice what it needs)."""
    from flashcore_hf.cache.pools import PoolArena

    releases = []
    release = GrowableBuffer.release_memory
    monkeypatch.setattr(GrowableBuffer, "release_memory", lambda self: (releases.append(self), release(self))[1])
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    arena = PoolArena()
    generator = torch.Generator().manual_seed(0)

    def prefill(tokens):
        cache = PagedKVCache(config, page_size=4, pool_arena=arena)
        keys = [torch.randn(1, 2, tokens, 8, generator=generator) for _ in range(2)]
        for layer, k in enumerate(keys):
            cache.update(k, k + 1, layer)
        for layer, k in enumerate(keys):   # every stored key reads back, whatever the memory held before
            pages = torch.tensor(cache.page_table(0))
            stored = cache.layers[layer].k_pool[pages].reshape(-1, 2, 8)[:tokens]
            assert torch.equal(stored, k[0].transpose(0, 1))
        return cache

    first = prefill(4096)
    mapped = {key: buf.nbytes for key, buf in arena._buffers.items()}
    address = first.layers[0].k_pool.data_ptr()
    del first
    second = prefill(4000)
    assert releases == [] and {key: buf.nbytes for key, buf in arena._buffers.items()} == mapped
    assert second.layers[0].k_pool.data_ptr() == address
    del second
    third = prefill(64)
    assert len(releases) == 4                                            # k and v of both layers
    need = 16 * third.layers[0].pools.page_bytes                        # 64 tokens: 16 pages
    assert all(buf.nbytes <= 2 * need for buf in arena._buffers.values()) and min(mapped.values()) > 2 * need
