"""Compiled decode steps (flashcore_hf/hf/compiled_decode.py) on the CPU, without CUDA graphs.

A decode step is run the way the CUDA-graph runner captures it (PagedKVCache.begin_fixed_step on fixed buffers) and
compared, eager vs compiled. Most tests use backend="aot_eager": it traces exactly what inductor gets (dynamo, the
fake kernel of the attention op, AOTAutograd) in ~1 s, where CPU inductor takes ~15 s per cold compile (it builds
C++ kernels); so only one test compiles with inductor, a one-layer model, for the numbers. The GPU tests
(tests/gpu/test_compiled_decode_gpu.py, test_decode_graphs.py) cover inductor under CUDA-graph capture.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import flashcore_hf as fc
from flashcore_hf import CACHE_KWARG
from flashcore_hf.hf import compiled_forward
from flashcore_hf.hf.compiled_decode import CompiledDecodeStep
from flashcore_hf.hf.compiled_forward import StandInCache, active_step, tracing_compiled_step
from flashcore_hf.hf.decode_graphs import DecodeGraphRunner, _FixedStep
from tests.capture_checks import HostDataLog

CPU = torch.device("cpu")


def tiny_llama(layers: int = 2):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    return _flashcore(LlamaForCausalLM(config).eval())


def _flashcore(model):
    model.set_attn_implementation("flashcore")
    return model


class Step:
    """One decode step in fixed buffers (what a CUDA-graph capture sees), on the CPU: `begin()` before each forward
    through it; `kwargs` the forward's arguments (the cache under CACHE_KWARG)."""

    def __init__(self, cache: fc.PagedKVCache, next_ids: torch.Tensor):
        self.cache = cache
        self.plan = cache.plan_decode_step(CPU)
        self.buffers = _FixedStep(cache.fixed_decode_shape(self.plan), CPU)
        self.buffers.meta.copy_(self.buffers.shape.pack(*self.plan.host_parts, pin=False))
        self.buffers.input_ids.copy_(next_ids)
        self.buffers.position_ids.fill_(self.plan.padded_len - 1)
        self.kwargs = {"input_ids": self.buffers.input_ids, "position_ids": self.buffers.position_ids,
                       CACHE_KWARG: cache, "use_cache": True, "return_dict": True}

    def begin(self):
        self.cache.begin_fixed_step(self.buffers.device_step, self.buffers.shape, self.plan)
        return self.kwargs

    def finish(self):
        self.cache.finish_replayed_step(self.plan)


def prefill(model, ids, page_size=4, **cache_options) -> fc.PagedKVCache:
    cache = fc.PagedKVCache(model.config, page_size=page_size, **cache_options)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache})
    return cache


def eager_and_compiled(model, step: Step, compiled: CompiledDecodeStep):
    """Logits [B, V] of the step run eagerly and compiled (each writes the step's slots, with the same values up to
    rounding, before reading them)."""
    with torch.no_grad():
        eager = model(**step.begin()).logits[:, -1]
        step.begin()
        out = compiled(**step.kwargs).logits[:, -1]
    return eager, out


def test_compiled_step_matches_eager_step_and_full_forward(generator):
    """inductor (CPU): logits within float32 rounding of the eager fixed step and of a forward over the whole
    sequence without cache."""
    model = tiny_llama(layers=1)
    ids = torch.randint(1, 96, (2, 11), generator=generator)
    nxt = torch.randint(1, 96, (2, 1), generator=generator)
    step = Step(prefill(model, ids), nxt)
    compiled = CompiledDecodeStep(model.forward, backend="inductor")
    eager, out = eager_and_compiled(model, step, compiled)
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
    assert compiled.compiles == 1
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-4)


def test_one_graph_across_page_buckets_caches_and_layers(generator):
    """Page-count buckets 2 -> 4 -> 8, a new cache each time, 3 layers: one compiled graph (no graph break, no
    recompile: no per-layer int and no step value reaches the trace). Batch 1 and the first batch > 1 get a graph
    each; later batch sizes reuse the second (dynamic batch)."""
    model = tiny_llama(layers=3)
    compiled = CompiledDecodeStep(model.forward, backend="aot_eager")
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    buckets = []
    for prompt in (5, 12, 25):            # 4-token pages: 2, 4 and 7 pages with the new token
        ids = torch.randint(1, 96, (2, prompt), generator=generator)
        step = Step(prefill(model, ids), torch.randint(1, 96, (2, 1), generator=generator))
        buckets.append(step.plan.max_pages["full"])
        eager, out = eager_and_compiled(model, step, compiled)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        step.finish()
    assert buckets == [2, 4, 8]
    assert compiled.compiles == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks
    for batch, expected in ((1, 2), (3, 3), (5, 3), (1, 3)):
        ids = torch.randint(1, 96, (batch, 9), generator=generator)
        step = Step(prefill(model, ids), torch.randint(1, 96, (batch, 1), generator=generator))
        eager, out = eager_and_compiled(model, step, compiled)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        assert compiled.compiles == expected, (batch, compiled.compiles)


SPARSE_CASES = {
    "sparse": dict(policy="topk"),
    "sparse_signs": dict(policy="topk", scoring="signs"),
    "sparse_rerank": dict(policy="topk", rerank=2),
    "streaming": dict(policy="streaming"),
}


def case_step(case: str, generator):
    """(model, Step) of a decode step whose plan holds `case`: "plain"; "window" (sliding-window layouts, Mistral);
    "cascade" (pages that beams / samples share); a SPARSE_CASES policy (the LayerSelector runs inside the op);
    "padding" (left padding)."""
    if case == "window":
        torch.manual_seed(0)
        config = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6)
        model = _flashcore(MistralForCausalLM(config).eval())
    else:
        model = tiny_llama()
    options = {}
    if case in SPARSE_CASES:
        options["sparse"] = fc.SparseConfig(token_budget=8, sink_tokens=2, recent_tokens=2, dense_layers=1,
                                            **SPARSE_CASES[case])
    ids = torch.randint(1, 96, (1 if case == "cascade" else 3, 23), generator=generator)
    mask = None
    if case == "padding":
        mask = torch.ones_like(ids)
        mask[0, :9] = 0
        mask[2, :4] = 0
    cache = fc.PagedKVCache(model.config, page_size=4, **options)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
    if case == "cascade":
        cache.batch_repeat_interleave(4)          # four rows on the prompt's pages, as beams or samples
    step = Step(cache, torch.randint(1, 96, (cache.batch_size, 1), generator=generator))
    if case == "cascade":
        assert step.plan.cascade_key is not None
    if case == "window":
        assert "window" in step.plan.max_pages
    if case in SPARSE_CASES:
        assert step.plan.sparse is not None and step.plan.sparse.select
    return model, step


@pytest.mark.parametrize("case", ["window", "cascade", "sparse", "sparse_signs", "padding"])
def test_windows_beams_sparse_and_padding(case, generator):
    """The attention op runs whatever the step's plan holds: sliding-window layouts (Mistral), a cascade over pages
    that beams / samples share, sparse page selection (the LayerSelector runs inside the op), left padding."""
    model, step = case_step(case, generator)
    compiled = CompiledDecodeStep(model.forward, backend="aot_eager")
    eager, out = eager_and_compiled(model, step, compiled)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    assert compiled.compiles == 1


@pytest.mark.parametrize("case", ["plain", "window", "cascade", *SPARSE_CASES, "padding"])
def test_captured_step_needs_no_host_data(case, generator):
    """The forward a graph captures (the eager fixed-buffer step) reads no device value back and brings no host data
    in, whatever its plan holds: on the CPU, the check that a capture on the GPU would not be refused."""
    model, step = case_step(case, generator)
    with torch.no_grad(), HostDataLog() as log:
        model(**step.begin())
    assert log.hits == []


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_oss", "phi3", "qwen3"])
def test_other_families_compile_whole(model_type, generator):
    """Families whose forward differs from Llama's (softcap and hybrid sliding layers, sinks and MoE, fused qkv,
    q/k norms) compile into one graph and match their eager step."""
    from tests.test_hf_families import available, build

    if not available(model_type):
        pytest.skip(f"no {model_type} in this transformers")
    model = build(model_type)
    step = Step(prefill(model, torch.randint(3, 128, (2, 13), generator=generator)),
                torch.randint(3, 128, (2, 1), generator=generator))
    compiled = CompiledDecodeStep(model.forward, backend="aot_eager")
    eager, out = eager_and_compiled(model, step, compiled)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    assert compiled.compiles == 1


def test_attention_op_opcheck(generator):
    """The custom op's schema and fake kernel (shape, strides) agree with its implementation. (Not opcheck's AOT
    dispatch test: it runs the op several times in one step, and a layer's second run in a step starts a new step.)"""
    model = tiny_llama(layers=1)
    ids = torch.randint(1, 96, (2, 7), generator=generator)
    step = Step(prefill(model, ids), torch.zeros(2, 1, dtype=torch.long))
    q = torch.randn(2, 1, 4, 16, generator=generator).transpose(1, 2)     # HF's layout: [B, Hq, S, D], S-major
    k, v = (torch.randn(2, 1, 2, 16, generator=generator).transpose(1, 2) for _ in range(2))
    with active_step(step.cache):
        for test in ("test_schema", "test_faketensor"):
            step.begin()
            torch.library.opcheck(torch.ops.flashcore.step_attention.default,
                                  (q, k, v, None, 0, 0.25, None, True, None, None), test_utils=(test,))
    with pytest.raises(RuntimeError, match="inside a compiled forward"):
        torch.ops.flashcore.step_attention(q, k, v, None, 0, 0.25, None, True, None, None)


def test_compile_failure_falls_back_with_one_warning(generator):
    """A forward torch.compile cannot take whole (here: one that asks the cache for its length, which a compiled
    step does not expose) makes the runner warn once, count the reason and capture the uncompiled forward."""
    model = tiny_llama(layers=1)
    runner = DecodeGraphRunner(model, model.forward)
    assert runner._compile_this_capture()
    fc.set_compiled_decode(True, backend="aot_eager")
    try:
        for attempt in range(2):
            step = Step(prefill(model, torch.randint(1, 96, (2, 6), generator=generator)),
                        torch.zeros(2, 1, dtype=torch.long))
            kwargs = {k: v for k, v in step.kwargs.items() if k != "position_ids"}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with torch.no_grad():
                    ok = runner._warm_up_compiled(step.cache, step.buffers, step.plan, kwargs)
            assert not ok
            warned = [w for w in caught if issubclass(w.category, fc.FlashCoreCompileWarning)]
            assert len(warned) == (1 if attempt == 0 else 0)
    finally:
        fc.set_compiled_decode(True, backend="inductor")
    assert sum(runner.stats.compile_failures.values()) == 2
    assert "cache length" in next(iter(runner.stats.compile_failures))
    assert not runner._compile_this_capture()            # later captures take the uncompiled forward
    assert not tracing_compiled_step()


class _NoCuda:
    """Stand-ins for the CUDA calls of DecodeGraphRunner._capture, so that its Python runs on the CPU: streams and
    graphs do nothing (the "captured" forward runs once, as in a capture)."""

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            pass

    @classmethod
    def install(cls, monkeypatch):
        import contextlib

        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "Stream", cls.Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: cls.Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", cls.CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())


def test_runner_capture_compiles_once_and_reports(monkeypatch, generator):
    """DecodeGraphRunner._capture's Python on the CPU (CUDA calls stubbed): the warm-up compiles, the capture reuses
    the compiled code under fail_on_recompile, a capture of another bucket compiles nothing; the stats say so; a
    forward that cannot compile is captured uncompiled under a key that says so."""
    _NoCuda.install(monkeypatch)
    fc.set_compiled_decode(True, backend="aot_eager")
    try:
        model = tiny_llama()
        runner = DecodeGraphRunner(model, model.forward)
        for n, prompt in enumerate((5, 25)):
            cache = prefill(model, torch.randint(1, 96, (2, prompt), generator=generator))
            plan = cache.plan_decode_step(CPU)
            key = (2, plan.max_pages["full"], None, cache.device_buffers(), cache.sparse, True)
            with torch.no_grad():
                step = runner._capture(cache, plan, CPU, key, compiled=True)
            stats = runner.stats
            assert step.compiled and key in runner._graphs and step.logits.shape == (2, 1, 96)
            assert (stats.captures, stats.compiled_captures, stats.compiles) == (n + 1, n + 1, 1)
            assert stats.compile_seconds > 0 and stats.capture_seconds > 0 and not stats.compile_failures
            cache.finish_replayed_step(plan)
        seconds = stats.compile_seconds

        def untraceable(self, *args):
            raise NotImplementedError("untraceable")

        monkeypatch.setattr(compiled_forward.StandInCache, "get_mask_sizes", untraceable)
        broken = DecodeGraphRunner(model, model.forward)
        cache = prefill(model, torch.randint(1, 96, (2, 6), generator=generator))
        plan = cache.plan_decode_step(CPU)
        with pytest.warns(fc.FlashCoreCompileWarning), torch.no_grad():
            step = broken._capture(cache, plan, CPU, (2, 2, None, (), cache.sparse, True), compiled=True)
        assert not step.compiled and (2, 2, None, (), cache.sparse, False) in broken._graphs
        assert broken.stats.compiled_captures == 0 and "untraceable" in next(iter(broken.stats.compile_failures))
        assert runner.stats.compile_seconds == seconds
    finally:
        fc.set_compiled_decode(True, backend="inductor")


def test_switches():
    """set_compiled_decode(False) and FLASHCORE_COMPILE_DECODE=0 turn compiled captures off (graphs stay on)."""
    model = tiny_llama(layers=1)
    runner = DecodeGraphRunner(model, model.forward)
    assert runner._compile_this_capture()
    fc.set_compiled_decode(False)
    try:
        assert not runner._compile_this_capture()
    finally:
        fc.set_compiled_decode(True)
    assert runner._compile_this_capture()
    code = "import flashcore_hf.hf.compiled_decode as c; print(c.compiled_decode_enabled())"
    env = {**os.environ, "FLASHCORE_COMPILE_DECODE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_model_unchanged_after_compiled_steps(generator):
    """Compiling changes nothing a later forward() sees: same logits bit for bit, no instance or class attribute
    replaced, the attention function registered as before."""
    from transformers import AttentionInterface

    model = tiny_llama()
    ids = torch.randint(1, 96, (2, 10), generator=generator)
    attention = AttentionInterface._global_mapping["flashcore"]
    forward_class = type(model).forward
    with torch.no_grad():
        before = model(input_ids=ids).logits
        before_paged = model(input_ids=ids, **{CACHE_KWARG: fc.PagedKVCache(model.config, page_size=4)}).logits
    compiled = CompiledDecodeStep(model.forward, backend="aot_eager")
    step = Step(prefill(model, ids), torch.randint(1, 96, (2, 1), generator=generator))
    eager_and_compiled(model, step, compiled)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
        after_paged = model(input_ids=ids, **{CACHE_KWARG: fc.PagedKVCache(model.config, page_size=4)}).logits
    assert torch.equal(after_paged, before_paged)
    assert "forward" not in model.__dict__ and type(model).forward is forward_class
    assert AttentionInterface._global_mapping["flashcore"] is attention
    assert not tracing_compiled_step() and compiled_forward._ACTIVE_CACHE is None


def test_stand_in_cache():
    """What the model's mask code and layers see of the cache in a compiled step."""
    config = LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    stand_in = StandInCache(fc.PagedKVCache(config, page_size=4))
    k = torch.randn(1, 2, 1, 8)
    assert stand_in.update(k, k, 2)[0] is k
    assert stand_in.get_mask_sizes(1, 0) == (1, 0) and stand_in.get_query_offset(0) == 0
    assert stand_in.is_sliding == [False] * 3 and len(stand_in) == 3
    with pytest.raises(NotImplementedError, match="position_ids"):
        stand_in.get_seq_length()
