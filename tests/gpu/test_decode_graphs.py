"""CUDA-graph decode (flashcore_hf.decode_graphs): generate() with graphs gives the same tokens as without.

Covers growing page tables (page boundaries crossed between replays), pool growth (re-capture), beams, sequences
finishing early, left padding, several batch sizes, reuse of graphs by the next generate() call, and decode steps a
user drives with model() calls over their own cache (no host sync between steps).

Bit-identity with eager decoding holds for graphs of the uncompiled forward (set_compiled_decode(False)): a replay
runs the eager step's kernels with its plans. The default, compiled forward (compiled_decode.py) fuses norms, rotary
and activations, which changes rounding: its greedy tokens agree with eager decoding except after a near-tie of the
two best logits (conftest.diverge_only_at_near_ties; its accuracy against fp32: test_compiled_decode_gpu.py).
"""
import gc

import pytest
import torch

import flashcore_hf as fc
from flashcore_hf import CACHE_KWARG
from tests.gpu.conftest import SMALL_VOCAB, diverge_only_at_near_ties

pytestmark = pytest.mark.gpu

VOCAB = SMALL_VOCAB


@pytest.fixture(scope="module")
def model(small_llama):
    return small_llama


def left_padded(lengths, generator):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, VOCAB, (n,), generator=generator)
        mask[row, width - n:] = 1
    return ids.cuda(), mask.cuda()


def generate(model, ids, mask, graphs: bool, compiled: bool = False, **kwargs):
    """Greedy generate(); graphs=True captures the uncompiled forward unless compiled=True."""
    fc.set_cuda_graphs(graphs)
    fc.set_compiled_decode(compiled)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kwargs)
    finally:
        fc.set_cuda_graphs(True)
        fc.set_compiled_decode(True)


@pytest.mark.parametrize("lengths", [[37], [70, 3, 45], [16, 16, 16, 16, 16]])
def test_greedy_identical_with_and_without_graphs(model, lengths, generator):
    ids, mask = left_padded(lengths, generator)
    eager = generate(model, ids, mask, graphs=False, max_new_tokens=40)
    replays = fc.decode_graph_stats(model).replays if fc.decode_graph_stats(model) else 0
    graphed = generate(model, ids, mask, graphs=True, max_new_tokens=40)
    stats = fc.decode_graph_stats(model)
    assert stats is not None and stats.replays - replays == 39      # every decode step replayed a graph
    assert torch.equal(eager, graphed)


def test_next_generate_call_reuses_graphs(model, generator):
    ids, mask = left_padded([50, 20], generator)
    first = generate(model, ids, mask, graphs=True, max_new_tokens=24)
    captures = fc.decode_graph_stats(model).captures
    second = generate(model, ids, mask, graphs=True, max_new_tokens=24)
    assert fc.decode_graph_stats(model).captures == captures         # same pools, same graphs: no re-capture
    assert torch.equal(first, second)


def test_pool_growth_mid_decode_recaptures(model, generator):
    """An explicit growable cache without a length hint grows while decoding; graphs are re-captured."""
    ids, mask = left_padded([30, 64], generator)
    eager = generate(model, ids, mask, graphs=False, max_new_tokens=150,
                     **{CACHE_KWARG: fc.PagedKVCache(model.config, page_size=16)})
    cache = fc.PagedKVCache(model.config, page_size=16)
    captures = fc.decode_graph_stats(model).captures
    graphed = generate(model, ids, mask, graphs=True, max_new_tokens=150, **{CACHE_KWARG: cache})
    assert fc.decode_graph_stats(model).captures >= captures + 2       # first capture + at least one growth
    assert torch.equal(eager, graphed)


def test_beam_search_identical(model, generator):
    ids, mask = left_padded([25, 40], generator)
    kwargs = dict(max_new_tokens=20, num_beams=3, num_return_sequences=2)
    assert torch.equal(generate(model, ids, mask, graphs=False, **kwargs),
                       generate(model, ids, mask, graphs=True, **kwargs))


def test_sequences_finishing_early(model, generator):
    ids, mask = left_padded([33, 12, 57], generator)
    probe = generate(model, ids, mask, graphs=False, max_new_tokens=12)
    eos = int(probe[0, ids.shape[1] + 4])           # row 0 emits this at step 5: it finishes early
    eager = generate(model, ids, mask, graphs=False, max_new_tokens=30, eos_token_id=eos)
    graphed = generate(model, ids, mask, graphs=True, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(eager, graphed)
    assert (eager[0, ids.shape[1] + 5:] == 0).all()                  # row 0 was padded after its eos


@pytest.mark.parametrize("compiled", [False, True])
def test_end_of_sequence_stop_read_a_step_late(model, generator, monkeypatch, compiled):
    """With graphs, generate() reads its stop flag a step late (patches/deferred_stop.py): a call that ends on its
    eos token runs one replay past it, which is undone. Against the same generate() reading it every step: the same
    tokens and scores, a returned cache one token short of the sequences, and the same continuation from it."""
    from transformers.generation.utils import DeferredStopCheck

    ids, mask = left_padded([41], generator)
    probe = generate(model, ids, mask, graphs=True, compiled=compiled, max_new_tokens=12)
    eos = int(probe[0, ids.shape[1] + 6])      # the call stops at or before new token 7
    original = DeferredStopCheck.is_supported
    deferred = []

    def spy(*args, **kwargs):
        deferred.append(original(*args, **kwargs))
        return deferred[-1] and allow_deferral

    monkeypatch.setattr(DeferredStopCheck, "is_supported", staticmethod(spy))
    runs = {}
    for allow_deferral in (False, True):
        cache = fc.PagedKVCache(model.config, page_size=16)
        replays = fc.decode_graph_stats(model).replays
        first = generate(model, ids, mask, graphs=True, compiled=compiled, max_new_tokens=30, eos_token_id=eos,
                         return_dict_in_generate=True, output_scores=True, **{CACHE_KWARG: cache})
        steps = fc.decode_graph_stats(model).replays - replays
        assert first.sequences[0, -1].item() == eos and cache.get_seq_length() == first.sequences.shape[1] - 1
        more = torch.ones_like(first.sequences)
        second = generate(model, first.sequences, more, graphs=True, compiled=compiled, max_new_tokens=9,
                          **{CACHE_KWARG: cache})
        runs[allow_deferral] = (first, steps, second)
    assert deferred == [True] * 4
    (plain, plain_steps, plain_next), (late, late_steps, late_next) = runs[False], runs[True]
    assert torch.equal(plain.sequences, late.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, late.scores))
    assert plain_steps == len(plain.scores) - 1 and late_steps == plain_steps + 1   # one replay past the stop
    assert torch.equal(plain_next, late_next)


def test_disable_compile_turns_graphs_off_for_the_call(model, generator):
    ids, mask = left_padded([20], generator)
    generate(model, ids, mask, graphs=True, max_new_tokens=4)
    replays = fc.decode_graph_stats(model).replays
    generate(model, ids, mask, graphs=True, max_new_tokens=8, disable_compile=True)
    assert fc.decode_graph_stats(model).replays == replays


@pytest.mark.parametrize("lengths", [[37], [70, 3, 45], [16, 16, 16, 16, 16]])
def test_compiled_greedy_agrees_with_eager_up_to_near_ties(model, lengths, generator):
    """Graphs of the compiled forward: every decode step replayed, tokens as eager decoding's up to near-ties."""
    ids, mask = left_padded(lengths, generator)
    kwargs = dict(max_new_tokens=40, output_logits=True, return_dict_in_generate=True)
    eager = generate(model, ids, mask, graphs=False, **kwargs)
    stats = fc.decode_graph_stats(model)
    replays = stats.compiled_replays if stats else 0
    graphed = generate(model, ids, mask, graphs=True, compiled=True, **kwargs)
    stats = fc.decode_graph_stats(model)
    assert stats.compiled_replays - replays == 39 and not stats.compile_failures
    identical = diverge_only_at_near_ties(eager, graphed, ids.shape[1])
    print(f"compiled vs eager, lengths {lengths}: {identical}/{len(lengths)} rows identical; {stats}")


def test_compiled_beams_sampling_and_early_finish(model, generator):
    """Beams (reordered page tables between replays), sampling and rows finishing early run through the compiled
    graphs: every decode step replayed, finished rows padded."""
    ids, mask = left_padded([33, 12, 57], generator)
    probe = generate(model, ids, mask, graphs=False, max_new_tokens=12)
    eos = int(probe[0, ids.shape[1] + 4])
    before = fc.decode_graph_stats(model).compiled_replays
    out = generate(model, ids, mask, graphs=True, compiled=True, max_new_tokens=30, eos_token_id=eos)
    assert fc.decode_graph_stats(model).compiled_replays > before
    finished = (out[:, ids.shape[1]:] == eos).int().argmax(1)
    for row in range(out.shape[0]):
        if (out[row, ids.shape[1]:] == eos).any():
            assert (out[row, ids.shape[1] + int(finished[row]) + 1:] == 0).all()
    beams = generate(model, ids, mask, graphs=True, compiled=True, max_new_tokens=20, num_beams=3,
                     num_return_sequences=2)
    assert beams.shape == (6, ids.shape[1] + 20)
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = model.generate(ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=20,
                                 num_return_sequences=4, pad_token_id=0)
    assert sampled.shape == (12, ids.shape[1] + 20)
    assert not fc.decode_graph_stats(model).compile_failures


def test_replays_reuse_the_captured_plans(model, generator, monkeypatch):
    """A replayed decode step plans nothing: the attention plans made while capturing are baked into the graph
    (only the prompt's step plans)."""
    from flashcore_hf.cache import step_plan

    ids, mask = left_padded([40], generator)
    generate(model, ids, mask, graphs=True, max_new_tokens=4)          # captures this bucket's graph
    calls = []
    original = step_plan.plan_attention
    monkeypatch.setattr(step_plan, "plan_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    stats = fc.decode_graph_stats(model)
    replays, captures = stats.replays, stats.captures
    generate(model, ids, mask, graphs=True, max_new_tokens=12)
    assert fc.decode_graph_stats(model).captures == captures
    assert fc.decode_graph_stats(model).replays - replays == 11
    assert len(calls) == 1                                              # the prefill step's plan


def user_decode_loop(model, ids, steps: int, busy_before_last: bool = False) -> torch.Tensor:
    """Greedy tokens [B, steps] of a prefill then decode steps the user runs with model() calls over their own
    PagedKVCache (no host sync in between); the cache is dropped right after the last step is queued.
    busy_before_last: keep the GPU busy before the last step, so that step still waits when the cache dies."""
    with torch.no_grad():
        cache = fc.PagedKVCache(model.config)
        token = model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
        tokens = []
        for t in range(steps):
            if busy_before_last and t == steps - 1:
                torch.cuda._sleep(200_000_000)      # ~0.1 s of GPU time
            positions = torch.full((ids.shape[0], 1), ids.shape[1] + t, device="cuda")
            logits = model(input_ids=token, position_ids=positions, use_cache=True, **{CACHE_KWARG: cache}).logits
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
        del cache, logits
        gc.collect()
        return torch.cat(tokens, 1).cpu()                 # raises if a step touched unmapped memory


@pytest.mark.parametrize("compiled", [False, True])
def test_user_cache_dropped_while_its_last_replays_are_queued(model, generator, compiled):
    """Decode steps a user drives over their own cache replay graphs without any host sync, so the host can drop
    the cache (and with it the pools) while its last steps still wait on the GPU. The pools' memory is unmapped only
    after them (before: an illegal memory access). Uncompiled replays give eager decoding's tokens exactly."""
    ids, mask = left_padded([64, 64], generator)
    generate(model, ids[:1, :8], mask[:1, :8], graphs=True, max_new_tokens=2)     # installs the graph runner
    fc.set_cuda_graphs(False)
    try:
        eager = user_decode_loop(model, ids, steps=6)
    finally:
        fc.set_cuda_graphs(True)
    replays = fc.decode_graph_stats(model).replays
    fc.set_compiled_decode(compiled)
    try:
        graphed = user_decode_loop(model, ids, steps=6, busy_before_last=True)
    finally:
        fc.set_compiled_decode(True)
    assert fc.decode_graph_stats(model).replays - replays == 6
    if not compiled:
        assert torch.equal(eager, graphed)
