"""generate() reading its stop flag one step late over a PagedKVCache (patches/deferred_stop.py; on by default on
CUDA with graphs): the same tokens, scores and returned cache as the per-step check, one extra forward only when a
row's end-of-sequence token stops the call, and a returned cache that continues exactly as the other one.

Driven on the CPU: the predicate is widened to the CPU for these tests and torch.Event (which the CPU backend lacks)
is a no-op stand-in; CPU work is synchronous, so that is what the events would report. tests/gpu/
test_repeated_generate.py runs the real thing on CUDA."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.generation.utils import DeferredStopCheck

import flashcore_hf as fc
from flashcore_hf import CACHE_KWARG
from flashcore_hf.patches import install_deferred_stop_check

CONFIG = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, pad_token_id=0)


class _HostEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def deferral(monkeypatch):
    """A switch for the deferred stop check of PagedKVCache generate() calls on the CPU; flashcore's own predicate
    comes back afterwards."""
    state = {"on": False}
    monkeypatch.setattr(torch, "Event", _HostEvent)
    install_deferred_stop_check(lambda device, cache: state["on"] and isinstance(cache, fc.PagedKVCache))
    yield state
    fc.register()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), attn_implementation="flashcore").eval()


class _ForwardCount:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


def _generate(model, ids, deferral, deferred: bool, **kwargs):
    """(output, forwards run, stop check class) of one generate() with the deferral on or off."""
    deferral["on"] = deferred
    used = []
    original = DeferredStopCheck.is_supported

    def spy(*args, **kwargs):
        used.append(original(*args, **kwargs))
        return used[-1]

    count = _ForwardCount(model)
    try:
        DeferredStopCheck.is_supported = staticmethod(spy)
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, return_dict_in_generate=True, output_scores=True, **kwargs)
    finally:
        DeferredStopCheck.is_supported = staticmethod(original)
        count.handle.remove()
    assert used == [deferred]
    return out, count.calls


def _eos_after(model, ids, step: int, **kwargs) -> int:
    """A token id the greedy continuation of `ids` emits first at new token `step` (row 0)."""
    with torch.no_grad():
        tokens = model.generate(ids, do_sample=False, max_new_tokens=step + 1, **kwargs)[0, ids.shape[1]:].tolist()
    candidates = [t for i, t in enumerate(tokens) if i >= step - 1 and t not in tokens[:i] and t != 0]
    assert candidates, tokens
    return candidates[0]


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("user_cache", [False, True])
def test_end_of_sequence_stop_is_undone(model, deferral, user_cache, rows):
    ids = torch.randint(1, 96, (rows, 7), generator=torch.Generator().manual_seed(1))
    eos = _eos_after(model, ids[:1], 4)
    runs = {}
    for deferred in (False, True):
        kwargs = dict(max_new_tokens=12, eos_token_id=eos)
        if user_cache:
            kwargs[CACHE_KWARG] = fc.PagedKVCache(model.config, page_size=4)
        runs[deferred] = _generate(model, ids, deferral, deferred, **kwargs)
    (plain, plain_calls), (deferred, deferred_calls) = runs[False], runs[True]
    assert torch.equal(plain.sequences, deferred.sequences)
    assert len(plain.scores) == len(deferred.scores) <= 12
    assert rows > 1 or len(plain.scores) == 4
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, deferred.scores))
    # Row 0 stops early; the call ends when every row has (one forward past the stop, undone) or at max length.
    assert deferred_calls == plain_calls + (1 if len(plain.scores) < 12 else 0)
    for out in (plain, deferred):
        cache = getattr(out, CACHE_KWARG)
        assert isinstance(cache, fc.PagedKVCache)
        assert cache.get_seq_length() == out.sequences.shape[1] - 1


SPARSE = fc.SparseConfig(policy="topk", token_budget=8, sink_tokens=2, recent_tokens=2, dense_layers=0)


def _summaries_by_position(cache) -> list[torch.Tensor]:
    """Each sparse layer's page bounds of row 0, in the row's page order."""
    pages = torch.tensor(cache.page_table(0))
    return [s.bounds[pages] for _, s in sorted(cache._sparse.summaries.items())]


@pytest.mark.parametrize("prompt", [9, 10])
@pytest.mark.parametrize("sparse", [None, SPARSE], ids=["dense", "topk"])
def test_a_returned_cache_continues_as_without_deferral(model, deferral, sparse, prompt):
    """The step past the stop is cropped from the returned cache, page key summaries included: the continuation
    selects, and scores, exactly as after a generate() that never ran that step. (Two prompt lengths: the step past
    the stop starts a page of its own or lands on a page that holds kept tokens.)"""
    ids = torch.randint(1, 96, (1, prompt), generator=torch.Generator().manual_seed(2))
    eos = _eos_after(model, ids, 3, **{CACHE_KWARG: fc.PagedKVCache(model.config, page_size=2, sparse=sparse)})
    continued = {}
    for deferred in (False, True):
        cache = fc.PagedKVCache(model.config, page_size=2, sparse=sparse)
        first, _ = _generate(model, ids, deferral, deferred, max_new_tokens=10, eos_token_id=eos,
                             **{CACHE_KWARG: cache})
        assert first.sequences[0, -1].item() == eos
        lengths = cache.sequence_lengths()
        summaries = _summaries_by_position(cache) if sparse is not None else []
        second, _ = _generate(model, first.sequences, deferral, deferred, max_new_tokens=12,
                              **{CACHE_KWARG: cache})
        continued[deferred] = (lengths, second.sequences, second.scores, summaries)
    assert continued[False][0] == continued[True][0]
    assert all(torch.equal(a, b) for a, b in zip(continued[False][3], continued[True][3]))
    assert torch.equal(continued[False][1], continued[True][1])
    assert all(torch.equal(a, b) for a, b in zip(continued[False][2], continued[True][2]))


def test_max_length_stop_runs_no_extra_forward(model, deferral):
    ids = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(3))
    (plain, plain_calls), (deferred, deferred_calls) = (
        _generate(model, ids, deferral, deferred, max_new_tokens=6, min_new_tokens=6) for deferred in (False, True))
    assert torch.equal(plain.sequences, deferred.sequences)
    assert deferred_calls == plain_calls == 6


def test_crop_zero_keeps_the_step_planned_ahead(model):
    cache = fc.PagedKVCache(model.config, page_size=4)
    with torch.no_grad():
        model.generate(torch.randint(1, 96, (2, 6)), max_new_tokens=2, do_sample=False, **{CACHE_KWARG: cache})
    cache.prepare_next_decode_step(torch.device("cpu"))
    planned = cache._next_decode
    assert planned is not None
    cache.crop(0)
    assert cache._next_decode is planned
    assert cache.plan_decode_step(torch.device("cpu")) is planned[0]
