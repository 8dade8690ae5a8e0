"""The tiled CPU paged_attention kernel against the float64 reference where tiling could go wrong: rows crossing
many key tiles, query tiles that end mid-sequence, head dims that are not a multiple of the vector width, pages
with holes, loose max_q_len bounds, and every instruction-set instantiation (FLASHCORE_CPU_ISA caps the dispatch).

The kernel's tiles: 64 keys; about 64 rows of (query position x query head of one kv head), i.e. 64 / group query
positions (tests/test_ops_paged_attention.py covers the contract itself).
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashcore_hf as fc
from tests.reference import reference_paged_attention

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ROOT = Path(__file__).resolve().parent.parent


def _layout(lengths, page_size, generator, holes=False):
    """Pages of the sequences in a shuffled pool; with holes, pages hold a random number of tokens (0 included)."""
    counts_per_seq = []
    for n in lengths:
        counts = []
        while n > 0:
            c = int(torch.randint(0, page_size + 1, (1,), generator=generator)) if holes else page_size
            c = min(c, n)
            counts.append(c)
            n -= c
        counts_per_seq.append(counts)
    num_pages = sum(len(c) for c in counts_per_seq) + 2
    perm = torch.randperm(num_pages, generator=generator).tolist()
    row_offsets, cols, token_counts = [0], [], []
    for counts in counts_per_seq:
        for c in counts:
            cols.append(perm.pop())
            token_counts.append(c)
        row_offsets.append(len(cols))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return num_pages, i32(row_offsets), i32(cols), i32(token_counts)


def run_case(generator, lengths, q_lens, *, page_size=16, hkv=2, group=4, head_dim=32, dtype=torch.float32,
             causal=True, window=None, sm_scale=None, softcap=None, sinks=False, holes=False, max_q_len=None,
             key_ramp=0.0):
    """Random paged K/V against the reference (lengths with B * Hkv entries: per-(sequence, kv head) page lists).

    key_ramp > 0 scales keys up along the sequence so that the running max of every row changes tile after tile.
    """
    num_pages, row_offsets, cols, counts = _layout(lengths, page_size, generator, holes)
    k_cache = torch.randn(num_pages, page_size, hkv, head_dim, generator=generator)
    v_cache = torch.randn(num_pages, page_size, hkv, head_dim, generator=generator)
    if key_ramp:
        for r in range(len(lengths)):
            pos = 0
            for j in range(int(row_offsets[r]), int(row_offsets[r + 1])):
                c = int(counts[j])
                k_cache[int(cols[j]), :c] *= (1 + key_ramp * torch.arange(pos, pos + c) / 64.0)[:, None, None]
                pos += c
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    q_indptr = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(q_indptr[-1]), hkv * group, head_dim, generator=generator).to(dtype)
    sink_logits = 3 * torch.randn(hkv * group, generator=generator) if sinks else None
    layout = fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))
    out, lse = fc.paged_attention(q, k_cache, v_cache, layout, q_indptr, causal=causal, sm_scale=sm_scale,
                                  sliding_window=window, softcap=softcap, sinks=sink_logits, return_lse=True,
                                  max_q_len=max_q_len)
    ref_out, ref_lse = reference_paged_attention(q, k_cache, v_cache, row_offsets, cols, counts, q_indptr,
                                                 causal=causal, sm_scale=sm_scale, sliding_window=window,
                                                 softcap=softcap, sinks=sink_logits)
    torch.testing.assert_close(out.double(), ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)
    return out, lse


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_long_rows_cross_many_tiles(generator, group, causal):
    """Prefill and chunked prefill over ~1K keys (16+ key tiles), query counts that are not a multiple of the query
    tile, keys growing along the row (the running max moves every tile)."""
    run_case(generator, [1100, 777, 64], [1100, 130, 64], group=group, causal=causal, key_ramp=0.5)


@pytest.mark.parametrize("head_dim", [1, 3, 17, 31, 33, 48, 100, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims_not_a_multiple_of_the_vector_width(generator, head_dim, dtype):
    run_case(generator, [300, 70], [150, 1], group=2, head_dim=head_dim, dtype=dtype)


def test_half_precision_long_rows(generator):
    run_case(generator, [700, 65], [90, 65], group=4, head_dim=72, dtype=torch.float16)


@pytest.mark.parametrize("window", [1, 50, 64, 65, 200])
def test_windows_and_tiles_straddling_sequences(generator, window):
    """Many sequences in one call with query counts around the tile sizes; window edges inside and on tile
    boundaries."""
    lengths = [1, 15, 17, 63, 65, 130, 300, 129]
    q_lens = [1, 15, 17, 63, 65, 130, 64, 1]
    run_case(generator, lengths, q_lens, page_size=16, group=4, window=window)
    run_case(generator, lengths, q_lens, page_size=7, group=1, window=window, causal=False)


@pytest.mark.parametrize("page_size", [1, 5, 64, 100])
def test_pages_with_holes(generator, page_size):
    """Pages hold any number of tokens (0 included), so key tiles start and end mid-page."""
    run_case(generator, [400, 33, 0, 257], [50, 33, 3, 1], page_size=page_size, group=2, head_dim=40, holes=True)


def test_loose_max_q_len(generator):
    """max_q_len is only an upper bound: extra query tiles are empty work items."""
    run_case(generator, [200, 90], [70, 3], group=4, max_q_len=1000)
    run_case(generator, [200, 90], [1, 1], group=8, max_q_len=64)


@pytest.mark.parametrize("softcap, sinks, window", [(5.0, True, None), (2.0, False, 100), (None, True, 33)])
def test_softcap_and_sinks_over_many_tiles(generator, softcap, sinks, window):
    run_case(generator, [600, 150], [200, 1], group=4, head_dim=64, sm_scale=3.0 * 64 ** -0.5, softcap=softcap,
             sinks=sinks, window=window, key_ramp=0.3)


def test_per_kv_head_rows_long(generator):
    """Per-(sequence, kv head) page lists of different lengths, several key tiles each."""
    run_case(generator, [500, 130, 0, 260], [40, 1], hkv=2, group=4, holes=True)


def test_no_keys_many_queries(generator):
    out, lse = run_case(generator, [0, 10], [100, 20], group=4)
    assert torch.all(out[:100] == 0) and torch.all(lse[:100] == -math.inf)


def _cpu_plan(lengths, q_lens, *, hkv=2, group=4, page_size=16):
    generator = torch.Generator().manual_seed(0)
    _, row_offsets, cols, counts = _layout(lengths, page_size, generator)
    layout = fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))
    q_indptr = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return fc.plan_attention(layout, q_indptr, num_q_heads=hkv * group, num_kv_heads=hkv, head_dim=32,
                             page_size=page_size, dtype=torch.float32)


def test_decode_batches_take_the_decode_kernel_with_key_splits():
    """Queries that fit one query tile per sequence take the decode kernel (items over key splits holding every kv
    head); one long sequence is split so every thread has work; short rows and prefills are not split."""
    plan = _cpu_plan([4096], [1])
    assert plan.kernel == "cpu_decode" and plan.splits > 1 and plan.workspace is not None
    plan = _cpu_plan([300, 200], [1, 1])
    assert plan.kernel == "cpu_decode" and plan.splits == 1
    assert _cpu_plan([4096], [17]).kernel == "cpu"  # 17 queries x 4 heads: more than one query tile


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("softcap, sinks, window", [(None, False, None), (5.0, True, None), (None, True, 700),
                                                    (2.0, False, 64)])
def test_decode_kernel_key_splits(generator, threads, softcap, sinks, window):
    """Split-KV decode: rows over thousands of keys merged from several splits (a window leaves some splits with no
    visible key for a row; a sequence with queries and no keys; speculative-decoding query counts)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_case(generator, [3000, 1500, 1, 0], [1, 4, 2, 1], group=4, head_dim=64, softcap=softcap, sinks=sinks,
                 window=window, key_ramp=0.1)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_kernel_per_kv_head_rows_and_half_precision(generator, dtype):
    """Per-(sequence, kv head) page lists (sparse selection) split per kv head; 16-bit pages converted per head."""
    run_case(generator, [2100, 1030, 0, 1600], [1, 3], hkv=2, group=4, holes=True, dtype=dtype)
    run_case(generator, [2500, 700], [1, 1], hkv=4, group=2, head_dim=40, dtype=dtype, causal=False)


_ISA_SCRIPT = """
import torch
from tests.test_ops_paged_attention_tiles import run_case
g = torch.Generator().manual_seed(1234)
run_case(g, [700, 1, 130], [700, 1, 40], group=4, key_ramp=0.5)
run_case(g, [300, 70], [150, 1], group=2, head_dim=33)
run_case(g, [300, 70], [150, 1], group=1, head_dim=100, dtype=torch.bfloat16, window=50)
run_case(g, [260, 40], [61, 1], group=8, head_dim=16, dtype=torch.float16, causal=False)
run_case(g, [400, 150], [100, 1], group=4, head_dim=64, sm_scale=0.4, softcap=5.0, sinks=True, holes=True)
run_case(g, [0, 10], [5, 20], group=3, head_dim=8, sinks=True)
run_case(g, [3000, 1200, 0], [1, 3, 1], group=4, head_dim=64, softcap=5.0, sinks=True, window=900)
run_case(g, [2100, 1030, 0, 1600], [1, 2], hkv=2, group=4, holes=True, dtype=torch.bfloat16)
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_instruction_set(isa):
    """The AVX2 and baseline instantiations (the process picks the widest the CPU has, AVX-512 here)."""
    env = dict(os.environ, FLASHCORE_CPU_ISA=isa, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(Path(fc.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
