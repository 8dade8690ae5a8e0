"""Bad input raises an error naming the argument, before any memory is read or written."""
import pytest
import torch

import flashcore_hf as fc


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _attention_args():
    k_cache = torch.randn(4, 8, 2, 16)
    v_cache = torch.randn(4, 8, 2, 16)
    q = torch.randn(3, 4, 16)
    layout = fc.PageLayout(_i32([0, 2, 3]), _i32([3, 1, 0]), _i32([8, 2, 5]), _i32([-1, -1, -1]))
    return q, k_cache, v_cache, layout, _i32([0, 1, 3])


def _replace(args, **changes):
    q, k_cache, v_cache, layout, q_indptr = args
    layout = layout._replace(**{k: v for k, v in changes.items() if k in layout._fields})
    return (changes.get("q", q), changes.get("k_cache", k_cache), changes.get("v_cache", v_cache), layout,
            changes.get("q_indptr", q_indptr))


def test_valid_arguments_run():
    fc.paged_attention(*_attention_args())


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.randn(3, 4, 16, dtype=torch.float64)), "q must be float32, float16 or bfloat16"),
    (dict(q=torch.randn(3, 64)), "q must be \\[total_q, num_q_heads, head_dim\\]"),
    (dict(q=torch.randn(3, 4, 16).half()), "k_cache dtype"),
    (dict(k_cache=torch.randn(4, 8, 2, 16).half()), "k_cache dtype"),
    (dict(v_cache=torch.randn(4, 8, 2, 8)), "v_cache shape"),
    (dict(k_cache=torch.randn(4, 8, 16)), "k_cache must be \\[num_pages"),
    (dict(k_cache=torch.randn(4, 2, 8, 16).transpose(1, 2)), "k_cache must be contiguous"),
    (dict(q=torch.randn(3, 3, 16)), "must be a multiple of num_kv_heads"),
    (dict(q=torch.randn(3, 4, 32)), "head_dim"),
    (dict(cols=_i32([3, 1, 4])), "cols\\[2\\] = 4 is not a page id"),
    (dict(cols=_i32([3, -1, 0])), "cols\\[1\\] = -1 is not a page id"),
    (dict(token_counts=_i32([8, 9, 5])), "token_counts\\[1\\] = 9 must be in \\[0, page_size=8\\]"),
    (dict(token_counts=_i32([8, -1, 5])), "token_counts\\[1\\] = -1"),
    (dict(row_offsets=_i32([0, 3, 2])), "row_offsets must be non-decreasing"),
    (dict(row_offsets=_i32([0, 2, 4])), "row_offsets\\[-1\\] = 4 exceeds len\\(cols\\)"),
    (dict(row_offsets=_i32([1, 2, 3])), "row_offsets\\[0\\] must be 0"),
    (dict(q_indptr=_i32([0, 2, 1])), "q_indptr must be non-decreasing"),
    (dict(q_indptr=_i32([0, 1, 2])), "q_indptr\\[-1\\] = 2 must equal total_q"),
    (dict(q_indptr=_i32([0, 1, 2, 3])), "row_offsets has 3 entries; it must have batch \\+ 1 = 4"),
    (dict(token_counts=_i32([8, 2])), "cols \\(3\\) and token_counts \\(2\\) must have the same length"),
    (dict(cols=torch.tensor([3, 1, 0])), "cols must be int32"),
    (dict(q_indptr=_i32([[0, 1, 3]])), "q_indptr must be 1-D"),
])
def test_paged_attention_rejects(change, message):
    with pytest.raises(RuntimeError, match=message):
        fc.paged_attention(*_replace(_attention_args(), **change))


def test_paged_attention_rejects_bad_options():
    args = _attention_args()
    with pytest.raises(ValueError, match="sliding_window"):
        fc.paged_attention(*args, sliding_window=0)
    with pytest.raises(RuntimeError, match="max_q_len = 1 but sequence 1 has 2 queries"):
        fc.paged_attention(*args, max_q_len=1)
    with pytest.raises(RuntimeError, match="max_pages_per_seq = 1 but layout row 0 reads 2 pages"):
        fc.paged_attention(*args, max_pages_per_seq=1)
    with pytest.raises(RuntimeError, match="sm_scale must be finite"):
        fc.paged_attention(*args, sm_scale=float("nan"))
    with pytest.raises(RuntimeError, match="softcap must be a finite number >= 0"):
        fc.paged_attention(*args, softcap=-1.0)
    with pytest.raises(RuntimeError, match="sinks must be \\[num_q_heads=4\\]"):
        fc.paged_attention(*args, sinks=torch.zeros(3))
    with pytest.raises(RuntimeError, match="sinks must be float32"):
        fc.paged_attention(*args, sinks=torch.zeros(4, dtype=torch.float16))


def _append_args():
    return torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8), _i32([0, 5])


@pytest.mark.parametrize("index, value, message", [
    (4, _i32([0, 12]), "slot_mapping\\[1\\] = 12 is outside the cache's 12 slots"),
    (4, _i32([0]), "slot_mapping must be \\[num_tokens=2\\]"),
    (4, torch.tensor([0.0, 1.0]), "slot_mapping must be int32 or int64"),
    (2, torch.randn(2, 2, 8).half(), "share one dtype"),
    (2, torch.randn(2, 3, 8), "v shape \\[2, 2, 8\\] must equal k shape \\[2, 3, 8\\]"),
    (3, torch.randn(2, 2, 4), "v shape"),
    (1, torch.zeros(3, 4, 2, 4), "v_cache shape"),
    (0, torch.zeros(3, 4, 2, 8, dtype=torch.int64), "k_cache must be float32, float16 or bfloat16"),
])
def test_append_kv_rejects(index, value, message):
    args = list(_append_args())
    before = [a.clone() for a in args[:2]]
    args[index] = value
    with pytest.raises(RuntimeError, match=message):
        fc.append_kv(*args)
    if index > 1:
        assert torch.equal(args[0], before[0]) and torch.equal(args[1], before[1])   # nothing written


def test_append_kv_out_of_range_slot_writes_nothing():
    k_cache, v_cache, k, v, _ = _append_args()
    with pytest.raises(RuntimeError, match="slot_mapping\\[1\\]"):
        fc.append_kv(k_cache, v_cache, k, v, _i32([0, 99]))
    assert torch.all(k_cache == 0) and torch.all(v_cache == 0)


@pytest.mark.parametrize("args, message", [
    ((_i32([0, 9]), _i32([0]), _i32([2]), torch.ones(4, dtype=torch.bool), 4, 4), "token_to_page\\[1\\] = 9"),
    ((_i32([0, -2]), _i32([0]), _i32([2]), torch.ones(4, dtype=torch.bool), 4, 4), "token_to_page\\[1\\] = -2"),
    ((_i32([0, 1]), _i32([0]), _i32([3]), torch.ones(4, dtype=torch.bool), 4, 4), "sequence 0 has seq_starts = 0, seq_ends = 3"),
    ((_i32([0, 1]), _i32([2]), _i32([1]), torch.ones(4, dtype=torch.bool), 4, 4), "sequence 0 has seq_starts = 2"),
    ((_i32([0, 1]), _i32([0, 1]), _i32([2]), torch.ones(4, dtype=torch.bool), 4, 4), "must have the same length"),
    ((_i32([0, 1]), _i32([0]), _i32([2]), torch.ones(3, dtype=torch.bool), 4, 4), "page_resident_bitmap has 3 entries"),
    ((_i32([0, 1]), _i32([0]), _i32([2]), torch.ones(4), 4, 4), "page_resident_bitmap must be a 1-D bool"),
    ((_i32([0, 0, 0]), _i32([0]), _i32([3]), torch.ones(4, dtype=torch.bool), 2, 4), "more than page_tokens=2"),
    ((_i32([0]), _i32([0]), _i32([1]), torch.ones(4, dtype=torch.bool), 0, 4), "page_tokens must be >= 1"),
    ((torch.tensor([0, 1]), _i32([0]), _i32([2]), torch.ones(4, dtype=torch.bool), 4, 4), "token_to_page must be int32"),
])
def test_build_layout_rejects(args, message):
    with pytest.raises(RuntimeError, match=message):
        fc.build_layout(*args)


def test_append_kv_rejects_heads_not_matching_cache():
    k_cache, v_cache, _, _, slots = _append_args()
    k = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="does not match k_cache"):
        fc.append_kv(k_cache, v_cache, k, k.clone(), slots)
