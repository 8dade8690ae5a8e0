"""Shared prompts: rows of a batch that repeat a prompt are prefilled once and share its pages, and decode reads the
shared pages once per group (cascade: "prefix" + "suffix" layouts merged by lse).

Unit level: merge_attention_states against attention over the union of the keys (float64), the grouping rule and
the cascade layouts. Model level (CPU, fp32, tiny random Llama): greedy, sampling (num_return_sequences), beam
search and a batch with repeated prompts in scattered order give the same tokens as the same flashcore run with
sharing off (share_prefixes=False) and as SDPA; the prefill runs once per distinct row; the decode steps ran as a
cascade; repeated generate() calls with different lengths in a row.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig

import flashcore_hf as fc
from flashcore_hf.cache.step_plan import (CASCADE_MIN_SAVED, PREFIX, SUFFIX, QueryRuns, cascade_layouts,
                                          prefix_splits, shared_prefixes)
from flashcore_hf.hf.attention import FlashCoreAttention
from flashcore_hf.ops import cascade_attention, merge_attention_states, plan_attention
from tests.reference import reference_paged_attention


def _attention(q, k, v, sinks=None):
    """out [T, H, D] and lse [T, H] (float64) of q [T, H, D] over keys k, v [N, H, D] (no mask)."""
    s = torch.einsum("thd,nhd->thn", q.double(), k.double()) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, dim=-1)
    if sinks is not None:
        lse_all = torch.logsumexp(torch.cat([s, sinks.double()[None, :, None].expand(s.shape[0], -1, 1)], -1), -1)
    else:
        lse_all = lse
    out = torch.einsum("thn,nhd->thd", torch.exp(s - lse_all[..., None]), v.double())
    return out, lse if s.shape[-1] else torch.full(lse.shape, -math.inf, dtype=torch.float64)


@pytest.mark.parametrize("split", [0, 7, 40])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_merge_attention_states_equals_attention_over_the_union(generator, split, with_sinks):
    t, h, d, n = 5, 3, 16, 40
    q, k, v = (torch.randn(x, h, d, generator=generator) for x in (t, n, n))
    sinks = torch.randn(h, generator=generator) if with_sinks else None
    whole, _ = _attention(q, k, v, sinks)
    a, lse_a = _attention(q, k[:split], v[:split])
    b, lse_b = _attention(q, k[split:], v[split:])
    if split == 0:
        a = torch.zeros_like(a)
    merged = merge_attention_states(a.float(), lse_a.float(), b.float(), lse_b.float(),
                                    None if sinks is None else sinks.float())
    torch.testing.assert_close(merged.double(), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cuts", [(0, 13, 40), (5, 5, 21, 40), (9, 40, 40, 40)])
def test_merge_of_part_a_in_key_splits(generator, cuts):
    """Part a as several partial states [S, T_a, H, D] (key splits, some empty) read through a_rows: the same as
    attention over all the keys."""
    t, h, d, n = 5, 3, 16, 40
    q, k, v = (torch.randn(x, h, d, generator=generator) for x in (t, n, n))
    rows = torch.tensor([4, 0, 3, 1, 2], dtype=torch.int32)
    sinks = torch.randn(h, generator=generator)
    whole, _ = _attention(q, k, v, sinks)
    starts = (0,) + cuts[:-1]
    parts = [_attention(q[rows.long().argsort()], k[a:b], v[a:b]) for a, b in zip(starts, cuts)]
    out_a = torch.stack([o if b > a else torch.zeros_like(o) for (o, _), a, b in zip(parts, starts, cuts)]).float()
    lse_a = torch.stack([lse for _, lse in parts]).float()
    rest, lse_rest = _attention(q, k[n:], v[n:])
    merged = merge_attention_states(out_a, lse_a, torch.zeros_like(rest).float(), lse_rest.float(), sinks,
                                    a_rows=rows)
    torch.testing.assert_close(merged.double(), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_reads_part_a_through_a_row_index(generator, dtype):
    t, h, d = 7, 4, 40
    out_a, out_b = torch.randn(3, h, d, generator=generator), torch.randn(t, h, d, generator=generator)
    lse_a, lse_b = torch.randn(3, h, generator=generator), torch.randn(t, h, generator=generator)
    lse_b[2] = -math.inf
    out_b[2] = 0
    rows = torch.tensor([2, 0, 1, 1, 0, 2, 2], dtype=torch.int32)
    sinks = torch.randn(h, generator=generator)
    merged = merge_attention_states(out_a.to(dtype), lse_a, out_b.to(dtype), lse_b, sinks, a_rows=rows)
    a, la = out_a.to(dtype).double()[rows.long()], lse_a.double()[rows.long()]
    m = torch.maximum(torch.maximum(la, lse_b.double()), sinks.double())
    wa, wb = torch.exp(la - m), torch.exp(lse_b.double() - m)
    denom = wa + wb + torch.exp(sinks.double() - m)
    ref = (a * wa[..., None] + out_b.to(dtype).double() * wb[..., None]) / denom[..., None]
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert merged.dtype == dtype
    torch.testing.assert_close(merged.double(), ref, atol=tol, rtol=tol)


def test_merge_rejects_bad_input():
    out, lse = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="a_rows\\[1\\] = 5"):
        merge_attention_states(out, lse, out, lse, a_rows=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="lse_b must be a contiguous float32"):
        merge_attention_states(out, lse, out, lse.double())
    with pytest.raises(RuntimeError, match="sinks must be"):
        merge_attention_states(out, lse, out, lse, torch.zeros(4))
    with pytest.raises(RuntimeError, match="one dtype"):
        merge_attention_states(out, lse, out.half(), lse)
    with pytest.raises(RuntimeError, match="same rows"):
        merge_attention_states(out[:1], lse[:1], out, lse)
    with pytest.raises(RuntimeError, match="lse_a must be a contiguous float32 \\[2, 2, 3\\]"):
        merge_attention_states(out.expand(2, 2, 3, 4).contiguous(), lse, out, lse)
    with pytest.raises(RuntimeError, match="out_a must be"):
        merge_attention_states(out[None, None], lse, out, lse)


def test_merge_opcheck(generator):
    out, lse = torch.randn(5, 2, 8, generator=generator), torch.randn(5, 2, generator=generator)
    rows = torch.tensor([4, 3, 2, 1, 0], dtype=torch.int32)
    torch.library.opcheck(torch.ops.flashcore.merge_attention_states, (out, lse, out + 1, lse - 1, None, rows))
    torch.library.opcheck(torch.ops.flashcore.merge_attention_states,
                          (torch.stack([out, out - 1]), torch.stack([lse, lse + 1]), out + 1, lse - 1, None, rows))


def test_merge_of_rows_without_keys_gives_zeros():
    out = torch.randn(2, 3, 4)
    empty = torch.full((2, 3), -math.inf)
    merged = merge_attention_states(torch.zeros_like(out), empty, torch.zeros_like(out), empty)
    assert torch.equal(merged, torch.zeros_like(out))


def test_groups_share_only_full_pages_before_each_rows_last_key():
    tables = [[5, 6, 7], [5, 6, 9], [5, 6, 7], [1], [3]]
    keys = [40, 35, 33, 5, 4]             # page size 16: row 2's last key is on its 3rd page
    shared = shared_prefixes(tables, keys, 16)
    assert shared is not None
    assert shared.order == [0, 1, 2, 3, 4] and shared.group_starts == [0, 3, 4, 5]
    assert shared.prefix_pages == [2, 0, 0]
    runs = QueryRuns(list(range(6)), list(range(5)), keys)
    layouts, largest, (order, inverse, group_indptr) = cascade_layouts(shared, runs, tables, 16)
    assert layouts[PREFIX].row_offsets.tolist() == [0, 2, 2, 2] and layouts[PREFIX].cols.tolist() == [5, 6]
    assert layouts[SUFFIX].cols.tolist() == [7, 9, 7, 1, 3]
    assert layouts[SUFFIX].token_counts.tolist() == [8, 3, 1, 5, 4]
    assert largest == {PREFIX: 2, SUFFIX: 1} and group_indptr.tolist() == [0, 3, 4, 5]
    assert order.tolist() == [0, 1, 2, 3, 4] and inverse.tolist() == [0, 1, 2, 3, 4]
    assert shared_prefixes(tables, [40, 35, 33, 20, 4], 16) is None   # 64 of 132 keys saved: under the threshold


def test_prefix_key_splits_are_rows_of_the_prefix_layout_split_major():
    tables = [[5, 6, 7, 8, 9, 20], [1, 2], [5, 6, 7, 8, 9, 21]]
    keys = [90, 20, 88]                     # page size 16: rows 0 and 2 share 5 full pages
    shared = shared_prefixes(tables, keys, 16, min_saved=0.0)
    assert shared.order == [0, 2, 1] and shared.group_starts == [0, 2, 3] and shared.prefix_pages == [5, 0]
    runs = QueryRuns(list(range(4)), list(range(3)), keys)
    layouts, largest, (order, inverse, group_indptr) = cascade_layouts(shared, runs, tables, 16, splits=3)
    # 5 pages in 3 splits of ceil(5 / 3) = 2: [5, 6], [7, 8], [9]; the row alone has no shared page in any split
    assert layouts[PREFIX].row_offsets.tolist() == [0, 2, 2, 4, 4, 5, 5]
    assert layouts[PREFIX].cols.tolist() == [5, 6, 7, 8, 9]
    assert order.tolist() == [0, 2, 1] * 3 and inverse.tolist() == [0, 2, 1]
    assert group_indptr.tolist() == [0, 2, 3, 5, 6, 8, 9] and largest[PREFIX] == 2


def test_rows_sharing_a_prefix_form_one_group_unless_capped():
    tables = [[1, 2, 3, 10 + r] for r in range(40)]
    shared = shared_prefixes(tables, [60] * 40, 16)
    assert shared.group_starts == [0, 40] and shared.prefix_pages == [3] and shared.largest_group == 40
    capped = shared_prefixes(tables, [60] * 40, 16, max_group=16)
    assert capped.group_starts == [0, 16, 32, 40] and capped.prefix_pages == [3, 3, 3]


def test_prefix_splits_fill_the_gpu_for_large_groups():
    def splits(rows, prefix_keys, page=64, heads=32, sms=132):
        tables = [list(range(prefix_keys // page)) + [10_000 + r] for r in range(rows)]
        shared = shared_prefixes(tables, [prefix_keys + 1] * rows, page)
        return prefix_splits(shared, page, heads, sms)
    assert splits(128, 2048) == 4          # 32 blocks of 128 query rows: 4 splits of 512 keys fill 132 SMs
    assert splits(256, 2048) == 2          # 64 blocks
    assert splits(64, 8192) == 8           # 16 blocks
    assert splits(64, 1024) == 2           # no split under CASCADE_SPLIT_KEYS keys
    assert splits(1000, 32768) == 1        # 250 blocks fill the GPU alone
    assert splits(16, 32768) == 1          # decode-sized groups: the decode kernel splits keys itself
    assert splits(128, 2048, sms=0) == 1   # CPU


def test_no_cascade_when_it_saves_little():
    tables = [[1, 2, 3], [1, 4, 5]]      # one shared page of six read
    assert shared_prefixes(tables, [48, 48], 16) is None
    assert 16 / 96 < CASCADE_MIN_SAVED


def _assert_cascade_equals_full_attention(tables, keys, page, shared, generator, *, group, num_pages=None, splits=1):
    """Decode rows (one query each) reading `keys[b]` keys through `tables[b]`: attention over the cascade layouts
    of `shared` (prefix grouped in `splits` key splits, non-causal; suffix per row) merged by lse
    (ops.cascade_attention) equals attention over each row's pages."""
    hkv, d = 2, 8
    num_pages = num_pages or max(p for t in tables for p in t) + 1
    k_pool = torch.randn(num_pages, page, hkv, d, generator=generator)
    v_pool = torch.randn(num_pages, page, hkv, d, generator=generator)
    rows = len(tables)
    runs = QueryRuns(list(range(rows + 1)), list(range(rows)), keys)
    layouts, _, (order, inverse, group_indptr) = cascade_layouts(shared, runs, tables, page, splits)
    q = torch.randn(rows, hkv * group, d, generator=generator)
    q_indptr = torch.arange(rows + 1, dtype=torch.int32)
    options = dict(num_q_heads=hkv * group, num_kv_heads=hkv, head_dim=d, page_size=page, dtype=q.dtype)
    prefix_plan = plan_attention(layouts[PREFIX], group_indptr, causal=False, **options)
    suffix_plan = plan_attention(layouts[SUFFIX], q_indptr, **options)
    merged = cascade_attention(q, k_pool, v_pool, prefix_plan, layouts[PREFIX], suffix_plan, layouts[SUFFIX], order,
                               inverse, group_indptr, q_indptr)
    cols = torch.tensor([p for t, n in zip(tables, keys) for p in t[:-(-n // page)]], dtype=torch.int32)
    counts = torch.tensor([min(page, n - i * page) for n in keys for i in range(-(-n // page))], dtype=torch.int32)
    offsets = torch.tensor([0, *torch.tensor([-(-n // page) for n in keys]).cumsum(0).tolist()], dtype=torch.int32)
    ref, _ = reference_paged_attention(q, k_pool, v_pool, offsets, cols, counts, q_indptr, causal=True)
    torch.testing.assert_close(merged.double(), ref, atol=2e-5, rtol=2e-5)
    return layouts


def test_cascade_layouts_read_the_same_keys_as_the_full_layout(generator):
    """Attention over prefix (grouped, non-causal) merged with suffix equals attention over each row's pages."""
    tables = [[3, 4, 5, 10], [7, 8, 11], [3, 4, 5, 12], [7, 8, 13], [3, 4, 14]]
    keys = [15, 11, 13, 9, 9]
    shared = shared_prefixes(tables, keys, 4, min_saved=0.0)
    _assert_cascade_equals_full_attention(tables, keys, 4, shared, generator, group=3, num_pages=30)


@st.composite
def _decode_batches(draw):
    """Page tables of a decode step whose rows continue a few prompts (shared leading pages, then their own), each
    row's key count, the page size, a group size cap and a prefix split count."""
    page = draw(st.integers(1, 5))
    trunks = draw(st.lists(st.lists(st.integers(0, 59), min_size=0, max_size=4, unique=True), min_size=1,
                           max_size=3))
    tables, keys, next_page = [], [], 60
    for _ in range(draw(st.integers(1, 7))):
        trunk = draw(st.sampled_from(trunks))
        own = draw(st.integers(1, 3))
        table = trunk + list(range(next_page, next_page + own))
        next_page += own
        tables.append(table)
        keys.append(draw(st.integers((len(table) - 1) * page + 1, len(table) * page)))
    return tables, keys, page, draw(st.integers(1, 4)), draw(st.integers(1, 3))


@given(_decode_batches(), st.integers(0, 2**16))
@settings(max_examples=80, deadline=None)
def test_cascade_equals_full_attention_on_random_decode_batches(batch, seed):
    """Any batch of rows sharing leading pages (any page size, partial last pages, group caps cutting groups, prefix
    key splits): the prefix attention (groups, non-causal) merged with each row's suffix equals attention over each
    row's pages."""
    tables, keys, page, max_group, splits = batch
    shared = shared_prefixes(tables, keys, page, min_saved=0.0, max_group=max_group)
    if shared is None:
        return
    assert sorted(shared.order) == list(range(len(tables)))
    assert all(b - a <= max_group for a, b in zip(shared.group_starts[:-1], shared.group_starts[1:]))
    layouts = _assert_cascade_equals_full_attention(tables, keys, page, shared, torch.Generator().manual_seed(seed),
                                                    group=2, splits=splits)
    for layout in layouts.values():
        assert layout.cols.numel() == layout.token_counts.numel() == int(layout.row_offsets[-1])


# ---- model level ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="flashcore", dtype=torch.float32).eval()


class _Counter:
    """Counts cascade decode layers and records the batch rows and columns of the model's prefill forwards."""

    def __init__(self, monkeypatch, model):
        self.cascades, self.prefill_rows, self.columns = 0, [], []
        original = FlashCoreAttention._cascade

        def cascade(attention, *args, **kwargs):
            self.cascades += 1
            return original(attention, *args, **kwargs)

        monkeypatch.setattr(FlashCoreAttention, "_cascade", cascade)
        forward = model.forward

        def counting_forward(*args, **kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[1] > 1:
                self.prefill_rows.append(ids.shape[0])
                self.columns.append(ids.shape[1])
            return forward(*args, **kwargs)

        monkeypatch.setattr(model, "forward", counting_forward)


def _generate(model, ids, share: bool, seed: int = 0, **kwargs):
    cache = fc.PagedKVCache(model.config, page_size=8, share_prefixes=share)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(ids, pad_token_id=0, **{fc.CACHE_KWARG: cache}, **kwargs)
    return out, cache


def test_repeated_prompts_in_scattered_rows_greedy(model, monkeypatch):
    prompts = torch.randint(1, 200, (3, 45), generator=torch.Generator().manual_seed(1))
    ids = prompts[[0, 1, 0, 2, 0, 0, 1, 0]]
    counter = _Counter(monkeypatch, model)
    shared_out, cache = _generate(model, ids, True, max_new_tokens=12, do_sample=False)
    assert counter.prefill_rows == [3] and counter.cascades > 0
    assert cache.stats().pages_shared > 0
    plain_out, _ = _generate(model, ids, False, max_new_tokens=12, do_sample=False)
    assert counter.prefill_rows == [3, 8]
    assert torch.equal(shared_out, plain_out)
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            sdpa_out = model.generate(ids, pad_token_id=0, max_new_tokens=12, do_sample=False)
    finally:
        model.set_attn_implementation("flashcore")
    assert torch.equal(shared_out, sdpa_out)


def test_large_groups_read_their_prefix_in_key_splits(model, monkeypatch):
    """A group larger than the decode kernel's takes the prefill kernel over key splits of its prefix (as on a GPU:
    the split rule is given a GPU's multiprocessor count and a small split size here): same tokens as without
    sharing, over several generate() calls of different lengths."""
    from flashcore_hf.cache import paged_cache, step_plan
    monkeypatch.setattr(paged_cache, "device_multiprocessors", lambda device: 132)
    monkeypatch.setattr(step_plan, "CASCADE_SPLIT_KEYS", 16)
    splits = []
    original = paged_cache.prefix_splits
    monkeypatch.setattr(paged_cache, "prefix_splits", lambda *args: splits.append(original(*args)) or splits[-1])
    generator = torch.Generator().manual_seed(4)
    for rows, length in ((20, 70), (24, 41), (20, 70)):
        ids = torch.randint(1, 200, (1, length), generator=generator).expand(rows, -1)
        splits.clear()
        shared_out, _ = _generate(model, ids, True, max_new_tokens=6, do_sample=False)
        assert splits and min(splits) >= 2, splits
        plain_out, _ = _generate(model, ids, False, max_new_tokens=6, do_sample=False)
        assert torch.equal(shared_out, plain_out), (rows, length)


def test_samples_and_beams_of_one_prompt(model, monkeypatch):
    prompt = torch.randint(1, 200, (2, 60), generator=torch.Generator().manual_seed(2))
    counter = _Counter(monkeypatch, model)
    for kwargs in (dict(do_sample=True, num_return_sequences=8, max_new_tokens=10),
                   dict(num_beams=4, num_return_sequences=2, max_new_tokens=10, do_sample=False)):
        counter.prefill_rows.clear()
        shared_out, _ = _generate(model, prompt, True, seed=3, **kwargs)
        assert counter.prefill_rows == [2]
        plain_out, _ = _generate(model, prompt, False, seed=3, **kwargs)
        assert torch.equal(shared_out, plain_out), kwargs
    assert counter.cascades > 0


def test_left_padded_repeats_and_repeated_calls_of_different_lengths(model):
    """Left padding inside the repeated rows; then calls with other lengths and batches, sharing on and off."""
    generator = torch.Generator().manual_seed(4)
    for length, rows in ((30, [0, 0, 1, 1, 0]), (75, [0, 0, 0, 0]), (9, [0, 1, 0, 1, 2, 2])):
        prompts = torch.randint(1, 200, (3, length), generator=generator)
        mask = torch.ones_like(prompts)
        mask[1, :length // 3] = 0                      # prompt 1 is left-padded
        ids, attention_mask = prompts[rows], mask[rows]
        outs = [_generate(model, ids, share, attention_mask=attention_mask, max_new_tokens=9, do_sample=False)[0]
                for share in (True, False)]
        assert torch.equal(outs[0], outs[1]), (length, rows)


def test_default_cache_option_turns_sharing_off(model, monkeypatch):
    counter = _Counter(monkeypatch, model)
    ids = torch.randint(1, 200, (1, 40), generator=torch.Generator().manual_seed(5)).repeat(4, 1)
    previous = fc.set_default_cache_options()
    try:
        fc.set_default_cache_options(share_prefixes=False)
        with torch.inference_mode():
            off = model.generate(ids, pad_token_id=0, max_new_tokens=6, do_sample=False)
        fc.set_default_cache_options(share_prefixes=True)
        with torch.inference_mode():
            on = model.generate(ids, pad_token_id=0, max_new_tokens=6, do_sample=False)
    finally:
        fc.set_default_cache_options(share_prefixes=previous["share_prefixes"])
    assert counter.prefill_rows == [4, 1] and torch.equal(on, off)


def test_pools_grow_for_the_new_tokens_only(model):
    """generate()'s cache grows its pools once, to the expected length; rows sharing a prompt count its pages once
    (16 copies of a 200-token prompt: 25 shared pages + 2 own pages per row, not 16 x 27)."""
    ids = torch.randint(1, 200, (1, 200), generator=torch.Generator().manual_seed(6)).repeat(16, 1)
    previous = fc.set_default_cache_options()
    try:
        fc.set_default_cache_options(page_size=8)
        with torch.inference_mode():
            out = model.generate(ids, pad_token_id=0, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                 return_dict_in_generate=True)
    finally:
        fc.set_default_cache_options(page_size=previous["page_size"])
    stats = getattr(out, fc.CACHE_KWARG).stats()
    assert stats.pages_used == 25 + 16 * 2 and stats.pages_total <= 2 * stats.pages_used, stats


# ---- prefix cache across generate() calls ----------------------------------------------------------------------

def _answer(model, ids, prefix_cache=None, **kwargs):
    cache = fc.PagedKVCache(model.config, page_size=16, prefix_cache=prefix_cache)
    with torch.inference_mode():
        out = model.generate(ids, pad_token_id=0, max_new_tokens=8, do_sample=False, **{fc.CACHE_KWARG: cache},
                             **kwargs)
    return out, cache


@pytest.mark.parametrize("chunk", [None, 64])
def test_later_calls_prefill_only_what_the_prefix_cache_lacks(model, monkeypatch, chunk):
    generator = torch.Generator().manual_seed(7)
    document = torch.randint(1, 200, (1, 300), generator=generator)
    questions = [torch.randint(1, 200, (1, n), generator=generator) for n in (7, 12, 5)]
    store = fc.PrefixCache(max_pages=64)
    lengths = _Counter(monkeypatch, model)
    for i, question in enumerate(questions):
        ids = torch.cat([document, question], dim=1)
        lengths.columns.clear()
        cached, _ = _answer(model, ids, store, prefill_chunk_size=chunk)
        computed = sum(lengths.columns)
        assert computed == ids.shape[1] - (0 if i == 0 else 288), (i, lengths.columns)   # 18 full pages reused
        plain, _ = _answer(model, ids, prefill_chunk_size=chunk)
        assert torch.equal(cached, plain)
    assert store.stats.lookups == 3 and store.stats.hits == 2 and store.stats.tokens_reused == 2 * 288


def test_prefix_cache_budget_evicts_least_recently_used_pages(model):
    generator = torch.Generator().manual_seed(8)
    documents = [torch.randint(1, 200, (1, 160), generator=generator) for _ in range(3)]   # 10 full pages each
    store = fc.PrefixCache(max_pages=25)
    for document in documents + documents[:1]:
        ids = torch.cat([document, torch.randint(1, 200, (1, 3), generator=generator)], dim=1)
        cached, _ = _answer(model, ids, store)
        assert torch.equal(cached, _answer(model, ids)[0])
    assert store.stats.pages_stored <= 25 and store.stats.evictions > 0
    # Document 0 was the least recently used when document 2 came: 5 of its pages went, its last ones first (a page
    # is useless without those before it), so the 4th call reuses its first 5 pages and prefills the rest.
    assert store.stats.hits == 1 and store.stats.tokens_reused == 5 * 16


def test_rows_reusing_one_prefix_share_its_pages(model):
    generator = torch.Generator().manual_seed(9)
    document = torch.randint(1, 200, (1, 200), generator=generator)
    store = fc.PrefixCache(max_pages=64)
    _answer(model, torch.cat([document, torch.randint(1, 200, (1, 4), generator=generator)], dim=1), store)
    batch = torch.cat([document.repeat(3, 1), torch.randint(1, 200, (3, 6), generator=generator)], dim=1)
    cached, cache = _answer(model, batch, store)
    assert store.stats.hits == 3 and cache.stats().pages_shared >= 12      # a lookup per row, one copy
    assert torch.equal(cached, _answer(model, batch)[0])


def test_prefix_cache_is_not_used_where_it_cannot_be_exact(model, monkeypatch):
    """Padded rows, another model object, sparse selection: the prompt is prefilled whole."""
    generator = torch.Generator().manual_seed(10)
    ids = torch.randint(1, 200, (2, 100), generator=generator)
    store = fc.PrefixCache(max_pages=64)
    lengths = _Counter(monkeypatch, model)
    _answer(model, ids, store)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    lengths.columns.clear()
    padded, _ = _answer(model, ids, store, attention_mask=mask)
    assert lengths.columns == [100] and torch.equal(padded, _answer(model, ids, attention_mask=mask)[0])
    other = AutoModelForCausalLM.from_config(model.config, attn_implementation="flashcore").eval()
    hits = store.stats.hits
    _answer(other, ids, store)
    assert store.stats.hits == hits
    sparse = fc.PagedKVCache(model.config, page_size=16, prefix_cache=store,
                             sparse=fc.SparseConfig(policy="streaming", token_budget=64, recent_tokens=16,
                                                    dense_layers=0))
    lengths.columns.clear()
    with torch.inference_mode():
        model.generate(ids, pad_token_id=0, max_new_tokens=4, do_sample=False, **{fc.CACHE_KWARG: sparse})
    assert lengths.columns == [100]


def test_prefix_cache_is_not_used_after_weights_change_in_place(model):
    """An optimizer step, load_state_dict or a manual edit changes the weights in place: K/V kept under the old
    weights must not be reused (the parameters' version counters are part of the model's signature)."""
    edited = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 200, (1, 100), generator=generator)
    store = fc.PrefixCache(max_pages=64)
    _answer(edited, ids, store)
    _answer(edited, ids, store)
    assert store.stats.hits == 1                       # unchanged weights: the prompt's pages are reused
    with torch.no_grad():
        edited.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    cached, _ = _answer(edited, ids, store)
    assert store.stats.hits == 1                       # edited weights: prefilled whole
    assert torch.equal(cached, _answer(edited, ids)[0])
    edited.load_state_dict(model.state_dict())         # back to the original values, copied in place
    _answer(edited, ids, store)
    assert store.stats.hits == 1


def test_prefix_cache_options_and_bad_values(model, monkeypatch):
    with pytest.raises(ValueError, match="max_pages"):
        fc.PrefixCache(max_pages=0)
    with pytest.raises(TypeError, match="prefix_cache"):
        fc.PagedKVCache(model.config, prefix_cache="yes")
    with pytest.raises(TypeError, match="prefix_cache"):
        fc.set_default_cache_options(prefix_cache=64)
    store = fc.PrefixCache(max_pages=32)
    ids = torch.randint(1, 200, (1, 90), generator=torch.Generator().manual_seed(11))
    lengths = _Counter(monkeypatch, model)
    previous = fc.set_default_cache_options()
    try:
        fc.set_default_cache_options(prefix_cache=store)
        for _ in range(2):
            with torch.inference_mode():
                model.generate(ids, pad_token_id=0, max_new_tokens=3, do_sample=False)
    finally:
        fc.set_default_cache_options(prefix_cache=previous["prefix_cache"] or False)
    assert lengths.columns == [90, 90 - 64] and store.stats.hits == 1
