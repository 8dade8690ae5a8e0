"""CPU append_kv and build_layout: round trips, padding slots, shared and non-resident pages, opcheck."""
import torch

import flashcore_hf as fc


def test_append_kv_round_trip_with_padding(generator):
    num_pages, page_size, hkv, d = 6, 4, 2, 8
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        k_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype)
        v_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype)
        before_k, before_v = k_cache.clone(), v_cache.clone()
        k = torch.randn(5, hkv, d, generator=generator).to(dtype)
        v = torch.randn(5, hkv, d, generator=generator).to(dtype)
        slots = torch.tensor([23, -1, 0, 9, -7], dtype=torch.int64)
        fc.append_kv(k_cache, v_cache, k, v, slots)
        expected_k, expected_v = before_k.view(-1, hkv, d).clone(), before_v.view(-1, hkv, d).clone()
        for t, s in enumerate(slots.tolist()):
            if s >= 0:
                expected_k[s], expected_v[s] = k[t], v[t]
        assert torch.equal(k_cache.view(-1, hkv, d), expected_k)
        assert torch.equal(v_cache.view(-1, hkv, d), expected_v)


def test_append_kv_strided_inputs_int32_slots(generator):
    k_cache = torch.zeros(3, 2, 2, 4)
    v_cache = torch.zeros(3, 2, 2, 4)
    k_bhsd = torch.randn(1, 2, 3, 4, generator=generator)   # HF layout [B, Hkv, S, D]
    k = k_bhsd[0].transpose(0, 1)                            # [S, Hkv, D], strided
    fc.append_kv(k_cache, v_cache, k, k, torch.tensor([5, 0, 2], dtype=torch.int32))
    flat = k_cache.view(-1, 2, 4)
    assert torch.equal(flat[5], k[0]) and torch.equal(flat[0], k[1]) and torch.equal(flat[2], k[2])


def test_append_kv_opcheck(generator):
    k_cache = torch.randn(4, 4, 2, 8, generator=generator)
    v_cache = torch.randn(4, 4, 2, 8, generator=generator)
    k = torch.randn(3, 2, 8, generator=generator)
    torch.library.opcheck(torch.ops.flashcore.append_kv, (k_cache, v_cache, k, k.clone(),
                                                          torch.tensor([1, 7, 15], dtype=torch.int64)))
    bounds = torch.randn(4, 2, 16, generator=generator)                 # with key bounds and signs (a decode step)
    signs = torch.zeros(4, 2, 4, 1, dtype=torch.uint8)
    torch.library.opcheck(torch.ops.flashcore.append_kv, (k_cache, v_cache, k, k.clone(),
                                                          torch.tensor([1, 7, 12], dtype=torch.int64), bounds, signs))


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def test_build_layout_first_touch_order_and_counts():
    # seq 0: pages 5,5,2,2,2,7 ; seq 1 shares page 5 (prefix) then page 3
    token_to_page = _i32([5, 5, 2, 2, 2, 7, 5, 5, 3])
    layout = fc.build_layout(token_to_page, _i32([0, 6]), _i32([6, 9]), torch.ones(8, dtype=torch.bool),
                             page_tokens=4, num_pages=8)
    assert layout.row_offsets.tolist() == [0, 3, 5]
    assert layout.cols.tolist() == [5, 2, 7, 5, 3]
    assert layout.token_counts.tolist() == [2, 3, 1, 2, 1]
    assert layout.staging_ids.tolist() == [-1] * 5
    assert all(t.dtype == torch.int32 for t in layout)


def test_build_layout_non_resident_pages_staged_once():
    token_to_page = _i32([4, 1, 1, 4, 6, 0])
    resident = torch.tensor([True, False, True, True, False, True, False])
    layout = fc.build_layout(token_to_page, _i32([0, 3, 5]), _i32([3, 5, 6]), resident, page_tokens=2, num_pages=7)
    # seq 0: pages 4 (staged 0), 1 (staged 1); seq 1: page 4 again (same slot 0), page 6 (staged 2); seq 2: page 0
    assert layout.cols.tolist() == [4, 1, 4, 6, 0]
    assert layout.staging_ids.tolist() == [0, 1, 0, 2, -1]
    assert layout.token_counts.tolist() == [1, 2, 1, 1, 1]


def test_build_layout_empty_sequences_and_batch():
    layout = fc.build_layout(_i32([3, 3]), _i32([0, 2, 1]), _i32([0, 2, 2]), torch.ones(4, dtype=torch.bool),
                             page_tokens=8, num_pages=4)
    assert layout.row_offsets.tolist() == [0, 0, 0, 1]
    empty = fc.build_layout(_i32([]), _i32([]), _i32([]), torch.ones(4, dtype=torch.bool), page_tokens=8, num_pages=4)
    assert empty.row_offsets.tolist() == [0] and empty.cols.numel() == 0


def test_build_layout_opcheck():
    args = (_i32([2, 2, 0]), _i32([0, 1]), _i32([2, 3]), torch.tensor([True, False, True]), 4, 3)
    torch.library.opcheck(torch.ops.flashcore.build_layout, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
