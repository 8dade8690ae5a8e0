"""flashcore::grouped_linear and the compiled decode step's rewrite of few-token linear layers into it
(flashcore_hf/hf/linear_grouping.py), on the CPU: the op's checks and reference semantics, which linears a traced
Llama groups, and that the rewritten graph computes what the model does. The CUDA kernel is tested against a
float64 reference in tests/gpu/test_grouped_linear_cuda.py."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import flashcore_hf as fc  # noqa: F401
from flashcore_hf.hf.linear_grouping import GROUPED_LINEAR_MAX_ROWS, group_small_linears
from flashcore_hf.ops import grouped_linear


def test_op_is_linear_per_weight_and_passes_opcheck(generator):
    x = torch.randn(2, 1, 24, generator=generator)
    weights = [torch.randn(n, 24, generator=generator) for n in (8, 5, 3)]
    biases = [None, torch.randn(5, generator=generator), None]
    outs = grouped_linear(x, weights, biases)
    for out, w, b in zip(outs, weights, biases):
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.flashcore.grouped_linear.default, (x, weights, biases))


@pytest.mark.parametrize("case, message", [
    ("no_weights", "weights must not be empty"),
    ("bias_count", "biases must have one entry"),
    ("weight_shape", "weights[1] must be [n, 24]"),
    ("weight_dtype", "weights[0] must have x's dtype"),
    ("bias_shape", "biases[0] must be [8]"),
])
def test_op_names_the_bad_argument(case, message, generator):
    x = torch.randn(1, 24, generator=generator)
    weights = [torch.randn(8, 24, generator=generator), torch.randn(4, 24, generator=generator)]
    biases = [None, None]
    if case == "no_weights":
        weights, biases = [], []
    elif case == "bias_count":
        biases = [None]
    elif case == "weight_shape":
        weights[1] = torch.randn(4, 23, generator=generator)
    elif case == "weight_dtype":
        weights[0] = weights[0].double()
    elif case == "bias_shape":
        biases[0] = torch.randn(7, generator=generator)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.flashcore.grouped_linear(x, weights, biases)


def _tiny(family="llama", layers=2):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2)
    model = (Qwen2ForCausalLM(Qwen2Config(**common)) if family == "qwen2" else LlamaForCausalLM(LlamaConfig(**common)))
    return model.to(torch.bfloat16).eval()


def _compiled_with_pass(model, max_rows=GROUPED_LINEAR_MAX_ROWS, dynamic=False):
    """The model's forward compiled with a backend that applies the rewrite; returns (fn, record)."""
    record = {"calls": [], "graphs": []}

    def backend(gm, example_inputs):
        record["calls"].append(group_small_linears(gm, max_rows=max_rows))
        record["graphs"].append(gm)
        return gm.forward

    fn = torch.compile(lambda ids: model(input_ids=ids, use_cache=False).logits, backend=backend, fullgraph=True,
                       dynamic=dynamic)
    return fn, record


def _targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tokens", [1, GROUPED_LINEAR_MAX_ROWS])
def test_llama_layers_group_q_k_v_and_gate_up(family, tokens, generator):
    """Per layer: q/k/v one call (Qwen2's biases included), o alone, gate/up one call, down alone; then lm_head:
    4 calls per layer + 1, no torch linear left, and the logits equal the model's (the CPU op is torch's linear)."""
    torch.manual_seed(0)
    model = _tiny(family)
    ids = torch.randint(0, 96, (1, tokens), generator=generator)
    fn, record = _compiled_with_pass(model)
    with torch.no_grad():
        got = fn(ids)
        want = model(input_ids=ids, use_cache=False).logits
    assert record["calls"] == [4 * 2 + 1]
    targets = _targets(record["graphs"][0])
    assert torch._C._nn.linear not in targets
    assert targets.count(torch.ops.flashcore.grouped_linear.default) == 9
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_more_rows_than_the_kernel_takes_are_left_alone(generator):
    model = _tiny()
    fn, record = _compiled_with_pass(model)
    with torch.no_grad():
        fn(torch.randint(0, 96, (1, GROUPED_LINEAR_MAX_ROWS + 1), generator=generator))
    assert record["calls"] == [0]
    assert torch._C._nn.linear in _targets(record["graphs"][0])


def test_float32_models_are_left_alone(generator):
    model = _tiny().float()
    fn, record = _compiled_with_pass(model)
    with torch.no_grad():
        fn(torch.randint(0, 96, (1, 1), generator=generator))
    assert record["calls"] == [0]


def test_dynamic_batch_is_grouped_and_the_op_decides_per_call(generator):
    """A graph compiled with a symbolic batch (dynamo's automatic dynamic shapes: the decode step's graph for every
    batch size > 1) groups its linears like a static one; the op takes any row count (the kernels up to 64 tokens,
    torch's linear per weight beyond), so the logits equal the model's at 2, 3 and 65 rows from one graph."""
    model = _tiny(layers=1)
    fn, record = _compiled_with_pass(model, dynamic=True)
    with torch.no_grad():
        for batch in (2, 3, GROUPED_LINEAR_MAX_ROWS + 1):
            ids = torch.randint(0, 96, (batch, 1), generator=generator)
            torch.testing.assert_close(fn(ids), model(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)
    assert record["calls"] == [4 * 1 + 1]
    assert torch._C._nn.linear not in _targets(record["graphs"][0])
