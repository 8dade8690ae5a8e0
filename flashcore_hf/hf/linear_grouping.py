"""Grouped linear layers in a compiled decode step: the linear layers that read the same few-token input (a Llama
layer's q/k/v projections, its gate/up projections) become one `flashcore::grouped_linear` call.

A decode step's linear layers are matrix-vector products bound by reading the weights. Run one by one (cuBLAS, as
inductor calls them), the small ones (the k/v projections of an 8B model are 8 MB each) cannot keep enough loads in
flight to reach the memory bandwidth, and every matrix pays a launch. The grouped op reads all of a group's weights
in one launch (a GEMV kernel at 1-2 tokens, a tensor-core kernel for q/k/v at 3-64). The weights stay where the
model keeps them (no concatenated copy: memory is unchanged and the module is not modified); only the traced graph is
rewritten, before inductor compiles it.

`group_small_linears(gm)` rewrites a dynamo FX graph in place: calls of torch's linear whose input has at most
`max_rows` tokens (float16 / bfloat16, a static last dimension that is a multiple of 8) are grouped by input node, up
to GROUPED_LINEAR_MAX_WEIGHTS per group in graph order; each group becomes one call whose outputs replace the
linears'. A single linear on such an input becomes a group of one. A symbolic token count (the decode step's graph
for batch sizes > 1 has a dynamic batch: compiled_decode.py) is grouped too, since the op takes any row count. Whether
a call runs a kernel or torch's linear per weight (more than 64 tokens; where that measured faster, e.g. an 8B model's
1 GB lm_head, or one or two weights at 3-64 tokens) is the op's decision, made per call on its shapes.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from ..ops import grouped_linear  # noqa: F401  (registers the op and its fake kernel)

GROUPED_LINEAR_MAX_ROWS = 64
"""Tokens up to which the CUDA op has a kernel (GroupedLinearParams::kMaxRows in csrc/kernels/params.h: the GEMV
to 2, the sm_90a tensor-core kernel beyond; the op itself picks kernel or cuBLAS per call)."""
GROUPED_LINEAR_MAX_WEIGHTS = 4
"""Weights one call takes (GroupedLinearParams::kMaxWeights)."""

_LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _example(node) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _static(t: torch.Tensor) -> bool:
    return all(isinstance(d, int) for d in t.shape)


def _linear_args(node: torch.fx.Node):
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return x, weight, bias


def _groupable(x, weight, bias, max_rows: int) -> bool:
    """Whether linear(x, weight, bias) can join a group: x in a kernel dtype with a static last dimension k and at
    most max_rows tokens (or a symbolic count, left to the op per call), the weight [n, k] static and contiguous in
    x's dtype and device, the bias None or [n]."""
    xv, wv = _example(x), _example(weight)
    if xv is None or wv is None or xv.dim() < 1 or not _static(wv):
        return False
    k = xv.shape[-1]
    if not isinstance(k, int) or xv.dtype not in _KERNEL_DTYPES or k == 0 or k % 8 != 0:
        return False
    if _static(xv) and xv.numel() // k > max_rows:
        return False
    if wv.dim() != 2 or wv.shape[1] != k or wv.dtype != xv.dtype or wv.device != xv.device or \
            not wv.is_contiguous():
        return False
    if bias is None:
        return True
    bv = _example(bias)
    return bv is not None and bv.shape == (wv.shape[0],) and bv.dtype == xv.dtype and bv.is_contiguous()


def group_small_linears(gm: torch.fx.GraphModule, max_rows: int = GROUPED_LINEAR_MAX_ROWS) -> int:
    """Rewrite gm's few-token linear layers into flashcore::grouped_linear calls (in place); returns the number of
    grouped calls made (0: gm unchanged)."""
    graph = gm.graph
    position = {node: i for i, node in enumerate(graph.nodes)}
    by_input: dict[torch.fx.Node, list[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node | None]]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
            continue
        x, weight, bias = _linear_args(node)
        if _groupable(x, weight, bias, max_rows):
            by_input.setdefault(x, []).append((node, weight, bias))
    calls = 0
    for x, linears in by_input.items():
        # The grouped call takes the place of the group's first linear, so every weight and bias must exist there.
        first = linears[0][0]
        linears = [entry for entry in linears
                   if all(position[arg] < position[first] for arg in entry[1:] if arg is not None)]
        for start in range(0, len(linears), GROUPED_LINEAR_MAX_WEIGHTS):
            group = linears[start:start + GROUPED_LINEAR_MAX_WEIGHTS]
            _replace_group(graph, x, group)
            calls += 1
    if calls:
        graph.lint()
        gm.recompile()
    return calls


def _replace_group(graph: torch.fx.Graph, x: torch.fx.Node, group) -> None:
    with graph.inserting_before(group[0][0]):
        grouped = graph.call_function(torch.ops.flashcore.grouped_linear.default,
                                      (x, [weight for _, weight, _ in group], [bias for _, _, bias in group]))
        grouped.meta["example_value"] = [node.meta.get("example_value") for node, _, _ in group]
        for j, (node, _, _) in enumerate(group):
            item = graph.call_function(operator.getitem, (grouped, j))
            item.meta.update(node.meta)
            node.replace_all_uses_with(item)
    for node, _, _ in group:
        graph.erase_node(node)
