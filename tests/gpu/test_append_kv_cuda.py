"""CUDA append_kv: scatter of new K/V rows into page slots, round-tripped through the decode kernel."""
from __future__ import annotations

import pytest
import torch

import flashcore_hf as fc

pytestmark = pytest.mark.gpu

DEV = "cuda"


def expected_caches(k_cache, v_cache, k, v, slots):
    """What the caches must hold afterwards (plain indexing; skipped slots leave the caches untouched)."""
    num_pages, page_size = k_cache.shape[:2]
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if 0 <= s < num_pages * page_size:
            k_exp[s // page_size, s % page_size] = k[t]
            v_exp[s // page_size, s % page_size] = v[t]
    return k_exp, v_exp


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "unaligned"])
def test_append_kv_writes_exactly_the_slots(dtype, slot_dtype, layout, generator):
    num_pages, page_size, hkv, d, tokens = 37, 16, 4, 128, 300
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype).to(DEV)
    v_cache = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(dtype).to(DEV)
    if layout == "contiguous":
        k = torch.randn(tokens, hkv, d, generator=generator).to(dtype).to(DEV)
        v = torch.randn(tokens, hkv, d, generator=generator).to(dtype).to(DEV)
    elif layout == "strided":  # e.g. k and v as views of one fused projection output
        kv = torch.randn(tokens, 2, hkv, d, generator=generator).to(dtype).to(DEV)
        k, v = kv[:, 0], kv[:, 1]
    else:  # head stride not a multiple of 16 bytes: the element-wise path
        k = torch.randn(tokens, hkv, d + 1, generator=generator).to(dtype).to(DEV)[..., 1:]
        v = torch.randn(tokens, hkv, d + 1, generator=generator).to(dtype).to(DEV)[..., :d]
    slots = torch.randperm(num_pages * page_size, generator=generator)[:tokens]
    slots[::7] = -1                                   # padding tokens
    slots[3] = num_pages * page_size                  # one past the pool: skipped
    slots[5] = num_pages * page_size + 1000           # far outside: skipped
    slots = slots.to(slot_dtype)
    k_exp, v_exp = expected_caches(k_cache, v_cache, k.cpu(), v.cpu(), slots)
    fc.append_kv(k_cache, v_cache, k, v, slots.to(DEV))
    torch.cuda.synchronize()
    assert torch.equal(k_cache.cpu(), k_exp.cpu())
    assert torch.equal(v_cache.cpu(), v_exp.cpu())


@pytest.mark.parametrize("head_dim", [64, 128])
def test_append_then_decode_round_trip(head_dim, generator):
    """Tokens appended one step at a time into scattered pages are read back by the decode kernel."""
    batch, page_size, hq, hkv, steps = 3, 16, 16, 4, 40
    num_pages = 64
    k_cache = torch.randn(num_pages, page_size, hkv, head_dim, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    pages = torch.randperm(num_pages, generator=generator)[:batch * 4].view(batch, 4)  # scattered, 4 per sequence
    k_all = torch.randn(batch, steps, hkv, head_dim, generator=generator).to(torch.bfloat16).to(DEV)
    v_all = torch.randn(batch, steps, hkv, head_dim, generator=generator).to(torch.bfloat16).to(DEV)
    for t in range(steps):
        slots = pages[:, t // page_size] * page_size + t % page_size
        fc.append_kv(k_cache, v_cache, k_all[:, t], v_all[:, t], slots.to(DEV))
    n_pages = (steps + page_size - 1) // page_size
    cols = pages[:, :n_pages].reshape(-1).to(torch.int32)
    counts = torch.tensor([min(page_size, steps - j * page_size) for j in range(n_pages)] * batch, dtype=torch.int32)
    row_offsets = torch.arange(0, batch * n_pages + 1, n_pages, dtype=torch.int32)
    layout = fc.PageLayout(row_offsets.to(DEV), cols.to(DEV), counts.to(DEV), torch.full_like(cols, -1).to(DEV))
    q = torch.randn(batch, hq, head_dim, device=DEV, dtype=torch.bfloat16)
    q_indptr = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
    out = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr, max_q_len=1, max_pages_per_seq=n_pages)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].float(), k_all.transpose(1, 2).float(), v_all.transpose(1, 2).float(), enable_gqa=True)
    assert (out.float() - ref[:, :, 0]).abs().max().item() < 2e-2
