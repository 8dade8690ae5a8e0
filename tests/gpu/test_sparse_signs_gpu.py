"""scoring="signs" on the GPU: key sign bits written by refresh and by decode updates (inside a CUDA graph too)
equal the CPU's, and the select_pages kernels with signs pick a top-k of the float64 oracle's scores (computed
from the keys), as the CPU op does, on scattered pages, partial pages, odd sizes and inside a CUDA graph."""
import pytest
import torch

import flashcore_hf as fc
from flashcore_hf.ops import select_pages
from flashcore_hf.sparse import PageKeySummaries, padded_page_table, refresh_slots
from tests.sparse_reference import assert_topk_picks, reference_sign_scores

pytestmark = pytest.mark.gpu


def _layout(lengths, page_size, num_pages, generator):
    pages = sum(-(-n // page_size) for n in lengths)
    cols = torch.randperm(num_pages, generator=generator)[:pages].to(torch.int32)
    counts = torch.cat([torch.tensor([page_size] * (n // page_size) + ([n % page_size] if n % page_size else []))
                        for n in lengths]).to(torch.int32)
    offsets = torch.tensor([0, *torch.tensor([-(-n // page_size) for n in lengths]).cumsum(0).tolist()],
                           dtype=torch.int32)
    return fc.PageLayout(offsets, cols, counts, torch.full_like(cols, -1))


CASES = [  # (Hkv, group, D, query_len, reduction, page size, q dtype)
    (8, 4, 128, 1, "max", 16, torch.bfloat16),
    (8, 4, 128, 1, "max", 64, torch.bfloat16),
    (2, 7, 64, 3, "sum", 16, torch.float16),      # 21 query heads per kv head: 6 passes of 4
    (1, 2, 20, 2, "max", 5, torch.float32),       # head dim 20: a half byte of padding bits
    (4, 1, 256, 1, "sum", 32, torch.bfloat16),    # the largest tables (44 KB per block), 8 words of bits per key
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"Hkv{c[0]}-G{c[1]}-D{c[2]}-nq{c[3]}-{c[4]}-P{c[5]}")
def test_select_pages_with_signs_cuda_is_a_top_k_of_the_oracle(generator, case):
    hkv, group, d, query_len, reduction, page_size, q_dtype = case
    num_pages, lengths = 700, [page_size * 150 + 3, 37, page_size * 40]
    pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.bfloat16)
    layout = _layout(lengths, page_size, num_pages, generator)
    q = torch.randn(len(lengths) * query_len, hkv * group, d, generator=generator).to(q_dtype)
    summaries = PageKeySummaries(keep_signs=True)
    summaries.refresh(pool.cuda(), *(t.cuda() for t in refresh_slots(layout.cols, layout.token_counts, page_size)))
    cpu = PageKeySummaries(keep_signs=True)
    cpu.refresh(pool, *refresh_slots(layout.cols, layout.token_counts, page_size))
    assert torch.equal(summaries.signs.cpu()[layout.cols.long()], cpu.signs[layout.cols.long()])
    table = padded_page_table(layout, 160, 1, 2)
    gpu_table = type(table)(table.pages.cuda(), table.counts.cuda(), table.bias.cuda())
    want = reference_sign_scores(q, pool, cpu.bounds, table, query_len, reduction)
    for budget in (1, 40, 160):
        args = (gpu_table.pages, gpu_table.counts, gpu_table.bias, budget, query_len, reduction)
        cols, counts = select_pages(q.cuda(), summaries.bounds, *args, summaries.signs)
        assert_topk_picks(cols.cpu(), counts.cpu(), want, table, budget, atol=1e-2)
        host = select_pages(q, cpu.bounds, table.pages, table.counts, table.bias, budget, query_len, reduction,
                            cpu.signs)
        assert_topk_picks(host[0], host[1], want, table, budget, atol=1e-2)


def test_select_pages_with_unaligned_signs_takes_the_generic_kernel(generator):
    """Sign rows at an address that is not a multiple of 8 (a contiguous view into a byte buffer) are read byte by
    byte by the generic kernel; its picks equal the unrolled kernel's on the same bits."""
    page_size, hkv, group, d = 16, 8, 4, 128
    pool = torch.randn(300, page_size, hkv, d, generator=generator).to(torch.bfloat16)
    layout = _layout([page_size * 200 + 9], page_size, 300, generator)
    summaries = PageKeySummaries(keep_signs=True)
    summaries.refresh(pool.cuda(), *(t.cuda() for t in refresh_slots(layout.cols, layout.token_counts, page_size)))
    unaligned = torch.empty(summaries.signs.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
    unaligned = unaligned.view(summaries.signs.shape)
    unaligned.copy_(summaries.signs)
    assert unaligned.data_ptr() % 8 != 0 and unaligned.is_contiguous()
    table = padded_page_table(layout, 256, 1, 2)
    args = (table.pages.cuda(), table.counts.cuda(), table.bias.cuda(), 20)
    q = torch.randn(1, hkv * group, d, generator=generator).to(torch.bfloat16).cuda()
    aligned_picks = select_pages(q, summaries.bounds, *args, signs=summaries.signs)
    generic_picks = select_pages(q, summaries.bounds, *args, signs=unaligned)
    assert torch.equal(aligned_picks[0], generic_picks[0]) and torch.equal(aligned_picks[1], generic_picks[1])


def test_select_pages_with_signs_in_a_cuda_graph(generator):
    page_size, hkv, group, d = 16, 8, 4, 128
    pool = torch.randn(300, page_size, hkv, d, generator=generator).to(torch.bfloat16)
    layout = _layout([page_size * 200 + 9], page_size, 300, generator)
    summaries = PageKeySummaries(keep_signs=True)
    summaries.refresh(pool.cuda(), *(t.cuda() for t in refresh_slots(layout.cols, layout.token_counts, page_size)))
    table = padded_page_table(layout, 256, 1, 2)
    gpu_table = type(table)(table.pages.cuda(), table.counts.cuda(), table.bias.cuda())
    q = torch.randn(1, hkv * group, d, generator=generator).to(torch.bfloat16).cuda()
    run = lambda: select_pages(q, summaries.bounds, gpu_table.pages, gpu_table.counts, gpu_table.bias, 20,
                               signs=summaries.signs)
    eager = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    q.copy_(torch.randn(1, hkv * group, d, generator=generator).to(torch.bfloat16))
    graph.replay()
    fresh = run()
    assert torch.equal(captured[0], fresh[0]) and torch.equal(captured[1], fresh[1])
    assert not torch.equal(eager[0], fresh[0])       # the new query picked other pages


def test_decode_sign_updates_in_a_cuda_graph(generator):
    """append_decode's sign writes replayed from a graph (rows without a key included) equal a refresh."""
    page_size, hkv, d, num_pages = 16, 8, 128, 64
    pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.bfloat16).cuda()
    summaries = PageKeySummaries(keep_signs=True)
    summaries.fit(pool)
    slots = torch.zeros(4, dtype=torch.int32, device="cuda")
    v_pool = torch.empty_like(pool)

    def append():   # the keys the pool already holds at `slots`, appended again (their bounds and signs folded in)
        keys = pool.view(-1, hkv, d)[slots.clamp(min=0).long()]
        summaries.append_decode(pool, v_pool, keys, keys, slots)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        append()                                              # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        append()
    pages = [5, 9, 33]
    for offset in range(page_size):
        slots.copy_(torch.tensor([pages[0] * page_size + offset, -1, pages[1] * page_size + offset,
                                  pages[2] * page_size + offset], dtype=torch.int32))
        graph.replay()
    full = PageKeySummaries(keep_signs=True)
    full.refresh(pool, *refresh_slots(torch.tensor(pages, device="cuda"),
                                      torch.full((3,), page_size, device="cuda"), page_size))
    assert torch.equal(summaries.signs[pages], full.signs[pages])
    torch.testing.assert_close(summaries.bounds[pages], full.bounds[pages], rtol=0, atol=0)
