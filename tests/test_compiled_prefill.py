"""Compiled prefill (flashcore_hf/hf/compiled_prefill.py) on the CPU: a prefill through CompiledPrefill against the
same prefill run eagerly.

backend="aot_eager" traces exactly what inductor gets (dynamo with dynamic shapes, the fake kernel of the attention
op, AOTAutograd) in about a second and runs the same ATen ops as eager code, so outputs must match eager ones to
float32 rounding; inductor's fused kernels are judged on the GPU (tests/gpu/test_compiled_prefill_gpu.py). What the
cache holds afterwards is checked through a decode step over it.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flashcore_hf as fc
from flashcore_hf import CACHE_KWARG
from flashcore_hf.hf import compiled_forward
from flashcore_hf.hf.compiled_forward import tracing_compiled_step
from flashcore_hf.hf.compiled_prefill import CompiledPrefill, decoder_layers, shared_int_attributes


def tiny_llama(layers: int = 3):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("flashcore")
    return model


def prefill_and_decode(model, ids, mask, prefill=None):
    """(prefill logits [B, S, V], logits [B, V] of one decode step over the cache the prefill wrote); the prefill
    eagerly, or through `prefill` (a CompiledPrefill)."""
    cache = fc.PagedKVCache(model.config, page_size=4)
    kwargs = {"input_ids": ids, "attention_mask": mask, CACHE_KWARG: cache, "use_cache": True}
    with torch.no_grad():
        out = model(**kwargs) if prefill is None else prefill(model.forward, decoder_layers(model), kwargs)
        nxt = torch.full((ids.shape[0], 1), 5)
        step_mask = None if mask is None else torch.cat([mask, torch.ones_like(nxt)], 1)
        step = model(input_ids=nxt, attention_mask=step_mask, **{CACHE_KWARG: cache}, use_cache=True)
    return out.logits, step.logits[:, -1]


def left_padded(generator, rows: int, length: int):
    ids = torch.randint(1, 96, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    for r in range(1, rows):
        mask[r, :r * 3] = 0
        ids[r, :r * 3] = 0
    return ids, mask


def test_compiled_prefill_matches_eager_across_lengths_and_batches(generator):
    """Batches of 2 rows (left-padded) of lengths 13 and 30, then 1 row of 21 and 9: the same logits as eager and
    the same K/V in the cache (the next decode step agrees). Graphs: at most 2 for 4 layers (not one per layer),
    none more for a new length, 1 more for a single row; the layers keep no instance forward afterwards."""
    model = tiny_llama(layers=4)
    prefill = CompiledPrefill(backend="aot_eager")
    compiles = []
    for rows, length in ((2, 13), (2, 30), (1, 21), (1, 9)):
        ids, mask = left_padded(generator, rows, length)
        eager, eager_step = prefill_and_decode(model, ids, mask)
        out, step = prefill_and_decode(model, ids, mask, prefill)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step, eager_step, rtol=1e-5, atol=1e-5)
        compiles.append(prefill.compiles)
    assert compiles == [2, 2, 3, 3] and prefill.runs == 4 and prefill.failure is None
    assert prefill.compile_seconds > 0
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert not tracing_compiled_step() and compiled_forward._ACTIVE_CACHE is None


def test_shared_int_attributes_are_constants_in_the_graph(generator):
    """The layers' shared integer attributes (head_dim, ...) reach the backend as constants, layer_idx as a graph
    input: symbolic, head_dim turned every index computation of the rotary kernels into a run-time division by it."""
    model = tiny_llama(layers=4)
    layers = decoder_layers(model)
    shared = {(".".join(path), name): value for path, name, value in shared_int_attributes(layers)}
    assert shared[("self_attn", "head_dim")] == 16 and shared[("", "hidden_size")] == 64
    assert ("self_attn", "layer_idx") not in shared and ("self_attn.q_proj", "out_features") not in shared
    prefill = CompiledPrefill(backend="aot_eager")
    symbolic_inputs = []

    def record(graph_module, example_inputs):
        symbolic_inputs.append({node.name for node in graph_module.graph.find_nodes(op="placeholder")
                                if isinstance(node.meta.get("example_value"), torch.SymInt)
                                and not node.meta["example_value"].node.expr.is_number})
        return graph_module.forward
    prefill._backend = record
    ids, mask = left_padded(generator, 2, 13)
    eager, _ = prefill_and_decode(model, ids, mask)
    out, _ = prefill_and_decode(model, ids, mask, prefill)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert symbolic_inputs and prefill.failure is None
    for names in symbolic_inputs:
        assert not any("head_dim" in name or "hidden_size" in name for name in names), names
    assert any("layer_idx" in name for names in symbolic_inputs for name in names)


def test_compile_failure_runs_the_layer_eagerly_once(monkeypatch, generator):
    """A layer that cannot be traced (here: the stand-in cache raises) runs eagerly in the same forward, its K/V
    written once (the decode step after it matches eager); later layers and calls do not try again."""
    model = tiny_llama()
    prefill = CompiledPrefill(backend="aot_eager")

    def untraceable(self, *args, **kwargs):
        raise NotImplementedError("untraceable")

    monkeypatch.setattr(compiled_forward.StandInCache, "update", untraceable)
    ids, mask = left_padded(generator, 2, 17)
    eager, eager_step = prefill_and_decode(model, ids, mask)
    out, step = prefill_and_decode(model, ids, mask, prefill)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step, eager_step, rtol=1e-6, atol=1e-6)
    assert "untraceable" in str(prefill.failure) and prefill.compiles == 0
    prefill_and_decode(model, ids, mask, prefill)
    assert prefill.compiles == 0 and prefill.runs == 2


def test_error_after_the_attention_op_ran_is_raised(monkeypatch, generator):
    """An error a compiled layer raises after its attention op ran (the layer's K/V may be in the cache) is not
    retried eagerly, which would write them twice: it reaches the caller."""
    model = tiny_llama(layers=1)
    prefill = CompiledPrefill(backend="aot_eager")
    original = compiled_forward._ATTENTION.forward

    def fails_after_writing(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("late failure")

    monkeypatch.setattr(compiled_forward._ATTENTION, "forward", fails_after_writing)
    ids, mask = left_padded(generator, 1, 9)
    with pytest.raises(RuntimeError, match="late failure"):
        prefill_and_decode(model, ids, mask, prefill)
    assert prefill.failure is None
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_decoder_layers():
    """Layers with an instance forward of their own (accelerate's hooks) are left alone."""
    model = tiny_llama(layers=2)
    assert decoder_layers(model) is model.model.layers
    model.model.layers[1].forward = model.model.layers[1].forward
    assert decoder_layers(model) is None


@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gpt_oss", "phi3", "qwen3"])
def test_other_families_match_eager(model_type, generator):
    """Families whose layers differ from Llama's (sliding windows, softcap and hybrid sliding layers, sinks and MoE,
    fused qkv, q/k norms) run compiled and match their eager prefill and the decode step after it, without a
    compile failure."""
    from tests.test_hf_families import available, build

    if not available(model_type):
        pytest.skip(f"no {model_type} in this transformers")
    model = build(model_type)
    prefill = CompiledPrefill(backend="aot_eager")
    ids, mask = left_padded(generator, 2, 19)
    ids = ids.clamp(max=model.config.vocab_size - 1)
    eager, eager_step = prefill_and_decode(model, ids, mask)
    out, step = prefill_and_decode(model, ids, mask, prefill)
    assert prefill.failure is None and prefill.compiles >= 1
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, eager_step, rtol=1e-5, atol=1e-5)


def test_sparse_cache_prefill(generator):
    """A sparse PagedKVCache (topk with the keys' signs): the prefill's page summaries are refreshed after the op's
    append as eagerly, so the decode step's selection and output match."""
    model = tiny_llama()
    config = fc.SparseConfig(policy="topk", token_budget=8, sink_tokens=4, recent_tokens=4, dense_layers=1,
                             scoring="signs")
    prefill = CompiledPrefill(backend="aot_eager")
    ids, mask = left_padded(generator, 2, 40)
    results = []
    for runner in (None, prefill):
        cache = fc.PagedKVCache(model.config, page_size=4, sparse=config)
        kwargs = {"input_ids": ids, "attention_mask": mask, CACHE_KWARG: cache, "use_cache": True}
        with torch.no_grad():
            out = model(**kwargs) if runner is None else runner(model.forward, decoder_layers(model), kwargs)
            nxt = torch.full((2, 1), 5)
            step = model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), use_cache=True,
                         **{CACHE_KWARG: cache})
        results.append((out.logits, step.logits))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)
    assert prefill.failure is None
