"""scoring="signs" on the GPU: key sign bits written by refresh and by decode updates (inside a CUDA graph too)
equal the CPU's, and the page scores match the float64 oracle computed from the keys."""
import pytest
import torch

import flashcore_hf as fc
from flashcore_hf.sparse import PageKeySummaries, padded_page_table, refresh_slots
from flashcore_hf.sparse.selection import pick_pages, sign_page_scores
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


@pytest.mark.parametrize("hkv, group, d, query_len, reduction", [(8, 4, 128, 1, "max"), (2, 7, 64, 3, "sum")])
def test_sign_scores_cuda_match_the_oracle(generator, hkv, group, d, query_len, reduction):
    page_size, num_pages, lengths = 16, 700, [4099, 37, 1600]
    pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.bfloat16)
    layout = _layout(lengths, page_size, num_pages, generator)
    q = torch.randn(len(lengths) * query_len, hkv * group, d, generator=generator).to(torch.bfloat16)
    summaries = PageKeySummaries(keep_signs=True)
    summaries.refresh(pool.cuda(), *(t.cuda() for t in refresh_slots(layout.cols, layout.token_counts, page_size)))
    cpu = PageKeySummaries(keep_signs=True)
    cpu.refresh(pool, *refresh_slots(layout.cols, layout.token_counts, page_size))
    assert torch.equal(summaries.signs.cpu()[layout.cols.long()], cpu.signs[layout.cols.long()])
    table = padded_page_table(layout, 260, 1, 2)
    gpu_table = type(table)(table.pages.cuda(), table.counts.cuda(), table.bias.cuda())
    scores = sign_page_scores(q.cuda(), summaries.bounds, summaries.signs, gpu_table, query_len, reduction)
    want = reference_sign_scores(q, pool, cpu.bounds, table, query_len, reduction)
    real = (table.counts > 0)[:, None].expand_as(want) & (table.bias == 0)[:, None]
    torch.testing.assert_close(scores.cpu()[real].double(), want[real], rtol=1e-4, atol=1e-2)
    cols, counts = pick_pages(scores, gpu_table, 40)
    assert_topk_picks(cols.cpu(), counts.cpu(), want, table, 40, atol=1e-2)


def test_decode_sign_updates_in_a_cuda_graph(generator):
    """update_decode's sign writes replayed from a graph (rows without a key included) equal a refresh."""
    page_size, hkv, d, num_pages = 16, 8, 128, 64
    pool = torch.randn(num_pages, page_size, hkv, d, generator=generator).to(torch.bfloat16).cuda()
    summaries = PageKeySummaries(keep_signs=True)
    summaries.fit(pool)
    slots = torch.zeros(4, dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        summaries.update_decode(pool, slots)                  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        summaries.update_decode(pool, slots)
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
