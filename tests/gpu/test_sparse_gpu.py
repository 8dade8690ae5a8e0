"""Sparse page selection on the GPU: top-k with a budget covering the context equals dense decode; top-k decode
with CUDA graphs gives the same tokens as without; selection runs in the decode kernel's per-head layouts."""
import pytest
import torch

import flashcore_hf as fc
from flashcore_hf import CACHE_KWARG
from tests.gpu.conftest import SMALL_VOCAB, diverge_only_at_near_ties
from tests.sparse_reference import assert_same_stored_keys

pytestmark = pytest.mark.gpu

VOCAB = SMALL_VOCAB


@pytest.fixture(scope="module")
def model(small_llama):
    return small_llama


def _generate(model, ids, cache, graphs, compiled=False, **kwargs):
    """Greedy, 24 tokens; graphs=True captures the uncompiled forward (bit-identical to eager) unless compiled."""
    fc.set_cuda_graphs(graphs)
    fc.set_compiled_decode(compiled)
    try:
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=24, do_sample=False, **{CACHE_KWARG: cache},
                                  return_dict_in_generate=True, output_logits=True, **kwargs)
    finally:
        fc.set_cuda_graphs(True)
        fc.set_compiled_decode(True)


def test_topk_with_budget_covering_context_matches_dense(model, generator):
    ids = torch.randint(1, VOCAB, (2, 700), generator=generator).cuda()
    dense = _generate(model, ids, fc.PagedKVCache(model.config, page_size=16), graphs=False)
    full = fc.SparseConfig(policy="topk", token_budget=4096, dense_layers=1)
    sparse = _generate(model, ids, fc.PagedKVCache(model.config, page_size=16, sparse=full), graphs=False)
    for step_dense, step_sparse in zip(dense.logits, sparse.logits):
        torch.testing.assert_close(step_sparse, step_dense, atol=2e-2, rtol=0)
    assert torch.equal(dense.sequences, sparse.sequences)


@pytest.mark.parametrize("policy, scoring", [("topk", "bounds"), ("topk", "signs"), ("streaming", "bounds")])
def test_sparse_decode_graphs_match_eager(model, policy, scoring, generator):
    """A small budget (pages really dropped), default cache (pool arena), graphs vs eager: the same tokens."""
    ids = torch.randint(1, VOCAB, (3, 900), generator=generator).cuda()
    config = fc.SparseConfig(policy=policy, token_budget=256, dense_layers=1, scoring=scoring)
    fc.set_default_cache_options(page_size=16, sparse=config)
    try:
        eager = _generate(model, ids, None, graphs=False)
        replays = fc.decode_graph_stats(model).replays if fc.decode_graph_stats(model) else 0
        graphed = _generate(model, ids, None, graphs=True)
        assert fc.decode_graph_stats(model).replays - replays == 23
        compiled_replays = fc.decode_graph_stats(model).compiled_replays
        compiled = _generate(model, ids, None, graphs=True, compiled=True)   # the LayerSelector inside the op
        assert fc.decode_graph_stats(model).compiled_replays - compiled_replays == 23
    finally:
        fc.set_default_cache_options(page_size=64, sparse=fc.SparseConfig())
    assert torch.equal(eager.sequences, graphed.sequences)
    if policy == "streaming":          # pages independent of the data: only rounding differs
        diverge_only_at_near_ties(eager, compiled, ids.shape[1])
    else:                              # topk: rounding may select other pages; print how long tokens agree
        same = (eager.sequences == compiled.sequences)[:, ids.shape[1]:]
        print(f"topk, compiled vs eager: tokens agree for {same.int().cumprod(1).sum(1).tolist()} of 24 steps")
    dense = _generate(model, ids, fc.PagedKVCache(model.config, page_size=16), graphs=False)
    assert not torch.equal(dense.logits[-1], eager.logits[-1])          # the policy really dropped pages


@pytest.mark.parametrize("scoring", ["bounds", "signs"])
def test_write_beside_selection_equals_writing_first(generator, scoring):
    """A "topk" decode layer's K/V write runs on a side stream beside its selection kernels (LayerWrite.run_beside):
    over several steps, crossing pages, the same pages, K/V and summaries as writing first on one stream."""
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=512, num_attention_heads=8, num_key_value_heads=2)
    sparse = fc.SparseConfig(policy="topk", token_budget=128, sink_tokens=16, recent_tokens=16, dense_layers=0,
                             scoring=scoring)
    held, first = (fc.PagedKVCache(config, page_size=16, sparse=sparse) for _ in range(2))
    prompt = torch.randn(3, 2, 301, 64, generator=generator).to("cuda", torch.bfloat16)
    for cache in (held, first):
        cache.update(prompt, prompt + 1, 0)[0].resolve()
    for _ in range(20):
        new = torch.randn(3, 2, 1, 64, generator=generator).to("cuda", torch.bfloat16)
        q = torch.randn(3, 8, 64, generator=generator).to("cuda", torch.bfloat16)
        h, f = (cache.update(new, new + 1, 0)[0].resolve() for cache in (held, first))
        assert h.write is not None
        layout = h.select_pages(q)
        f.write.run()
        expected = f.selector.select(q)
        torch.cuda.synchronize()
        assert torch.equal(layout.cols, expected.cols) and torch.equal(layout.token_counts, expected.token_counts)
        assert_same_stored_keys(held, first, 0)
