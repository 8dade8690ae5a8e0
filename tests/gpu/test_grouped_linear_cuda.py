"""CUDA flashcore::grouped_linear: the GEMV kernel (1-2 tokens) and the tensor-core kernel (3-64 tokens, sm_90a)
against a float64 reference, held to cuBLAS's error on the same inputs; the paths that fall back to torch's linear;
strided rows; CUDA-graph replay."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashcore_hf.hf.linear_grouping import GROUPED_LINEAR_MAX_ROWS
from flashcore_hf.ops import grouped_linear

pytestmark = pytest.mark.gpu

DEV = "cuda"


def make(generator, dtype, rows, k, ns, bias):
    x = torch.randn(rows, k, generator=generator).to(dtype).to(DEV)
    weights = [(torch.randn(n, k, generator=generator) / k ** 0.5).to(dtype).to(DEV) for n in ns]
    biases = [torch.randn(n, generator=generator).to(dtype).to(DEV) if bias and i % 2 == 0 else None
              for i, n in enumerate(ns)]
    return x, weights, biases


def reference(x, w, b):
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k, ns", [(8, [1]), (64, [3, 17]), (520, [33, 1, 64]), (4096, [4096, 1024, 1024]),
                                   (2056, [5, 7, 11, 13]), (14336, [40])])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_float64_within_cublas_error(dtype, rows, k, ns, bias, generator):
    """The GEMV (1-2 tokens; 3-4 take torch's linear unless the tensor-core kernel is on), k with a partial last
    group of chunks."""
    x, weights, biases = make(generator, dtype, rows, k, ns, bias)
    outs = grouped_linear(x, weights, biases)
    for out, w, b in zip(outs, weights, biases):
        assert out.shape == (rows, w.shape[0]) and out.dtype == dtype
        ref = reference(x, w, b)
        ours = (out.double() - ref).abs().max().item()
        cublas = (F.linear(x, w, b).double() - ref).abs().max().item()
        # Both round the same fp32 sum to the output dtype; the summation order differs (at most one more ulp).
        ulp = (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10) * ref.abs().max().item()
        assert ours <= cublas + ulp, (ours, cublas, ulp)


@pytest.mark.parametrize("rows", [2, 17])
def test_leading_dims_and_strided_rows(rows, monkeypatch, generator):
    """x [rows, 1, k] (a decode step's hidden states) and a row-strided x view give the same as a contiguous x
    (17 rows: the tensor-core kernel, whose TMA map carries the row stride)."""
    monkeypatch.setenv("FLASHCORE_GROUPED_LINEAR_KERNEL", "tensor_core")
    x, weights, biases = make(generator, torch.bfloat16, rows, 256, [40, 24], True)
    base = grouped_linear(x, weights, biases)
    for out, want in zip(grouped_linear(x.view(rows, 1, 256), weights, biases), base):
        assert out.shape == (rows, 1, want.shape[-1])
        torch.testing.assert_close(out.view_as(want), want, rtol=0, atol=0)
    wide = torch.zeros(rows, 512, dtype=torch.bfloat16, device=DEV)
    wide[:, :256] = x
    for out, want in zip(grouped_linear(wide[:, :256], weights, biases), base):
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    one = x[:1].expand(rows, 256)   # rows of stride 0: read as a contiguous copy
    for out, want in zip(grouped_linear(one, weights, biases), grouped_linear(one.contiguous(), weights, biases)):
        torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["many_rows", "float32", "k_not_multiple_of_8", "five_weights", "empty",
                                  "large_single_weight"])
def test_other_shapes_equal_torch_linear(case, generator):
    rows, k, ns, dtype = 2, 64, [16, 8], torch.bfloat16
    if case == "many_rows":
        rows = GROUPED_LINEAR_MAX_ROWS + 3
    elif case == "float32":
        dtype = torch.float32
    elif case == "k_not_multiple_of_8":
        k = 60
    elif case == "five_weights":
        ns = [8, 8, 8, 8, 8]
    elif case == "empty":
        rows = 0
    elif case == "large_single_weight":   # over 128 MiB alone: as fast through cuBLAS (grouped_linear_prefers_kernel)
        rows, k, ns = 1, 8192, [8256]
    x, weights, biases = make(generator, dtype, rows, k, ns, True)
    for out, w, b in zip(grouped_linear(x, weights, biases), weights, biases):
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [65, 128, 129])
@pytest.mark.parametrize("bias", [False, True])
def test_groups_on_torch_linear_side_by_side(rows, bias, generator):
    """Groups that torch's linear runs (over 64 tokens): up to 128 tokens the first weight's GEMM on the caller's
    stream and the others on a side stream beside it, 129 one after the other. Either way F.linear's outputs bit for
    bit, eager and in a replayed CUDA graph, and complete for the caller's stream: a kernel on it reads them at once."""
    x, weights, biases = make(generator, torch.bfloat16, rows, 4096, [4096, 1024, 1024, 512], bias)
    for _ in range(3):
        outs = grouped_linear(x, weights, biases)
        sums = torch.stack([out.float().sum() for out in outs])   # on the caller's stream, right behind the call
        wants = [F.linear(x, w, b) for w, b in zip(weights, biases)]
        assert torch.equal(sums, torch.stack([want.float().sum() for want in wants]))
        for out, want in zip(outs, wants):
            assert torch.equal(out, want)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = grouped_linear(static_x, weights, biases)
        sums = torch.stack([out.float().sum() for out in outs])
    for _ in range(3):
        static_x.copy_(torch.randn(x.shape, generator=generator).to(x.dtype).to(DEV))
        graph.replay()
        wants = [F.linear(static_x, w, b) for w, b in zip(weights, biases)]
        assert torch.equal(sums, torch.stack([want.float().sum() for want in wants]))
        for out, want in zip(outs, wants):
            assert torch.equal(out, want)


@pytest.mark.parametrize("rows", [1, 40])
def test_cuda_graph_replay(rows, monkeypatch, generator):
    monkeypatch.setenv("FLASHCORE_GROUPED_LINEAR_KERNEL", "tensor_core")
    x, weights, biases = make(generator, torch.bfloat16, rows, 4096, [1024, 512], False)
    static_x = x.clone()
    grouped_linear(static_x, weights, biases)   # warm up (launch configuration) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = grouped_linear(static_x, weights, biases)
    for _ in range(3):
        static_x.copy_(torch.randn(x.shape, generator=generator).to(x.dtype).to(DEV))
        graph.replay()
        for out, want in zip(outs, grouped_linear(static_x, weights, biases)):
            torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [3, 17, 32, 33, 64])
@pytest.mark.parametrize("k, ns", [(8, [1]), (136, [3, 17]), (520, [33, 1, 64]), (4096, [4096, 1024, 1024]),
                                   (2048, [200]), (14336, [40]), (520, [17000, 20000])])
@pytest.mark.parametrize("bias", [False, True])
def test_tensor_core_kernel_matches_float64_within_cublas_error(dtype, rows, k, ns, bias, monkeypatch, generator):
    """The tensor-core kernel (3-64 tokens; forced for every call it supports, by default it takes calls of 3+
    weights): token counts below and at its 32 / 64 padding, weights shorter than its 128-row tile, k not a multiple
    of its 64-element stage, the split-k clusters (4096 x [4096, 1024, 1024]: 48 tiles; 2048 x [200] and
    14336 x [40]: 2 and 1 tiles, split 4 and 8 ways on an H200) and more tiles than resident CTAs (520 x
    [17000, 20000]: 290 tiles, partial last tiles of both weights)."""
    monkeypatch.setenv("FLASHCORE_GROUPED_LINEAR_KERNEL", "tensor_core")
    x, weights, biases = make(generator, dtype, rows, k, ns, bias)
    outs = grouped_linear(x, weights, biases)
    for out, w, b in zip(outs, weights, biases):
        ref = reference(x, w, b)
        ours = (out.double() - ref).abs().max().item()
        cublas = (F.linear(x, w, b).double() - ref).abs().max().item()
        ulp = (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10) * ref.abs().max().item()
        assert ours <= cublas + ulp, (ours, cublas, ulp)


@pytest.mark.parametrize("rows, kernel", [(1, "grouped_linear_kernel"), (2, "grouped_linear_kernel"),
                                          (17, "grouped_linear_wgmma_kernel"), (64, "grouped_linear_wgmma_kernel")])
def test_the_kernel_runs(rows, kernel, monkeypatch, generator):
    """The results above could also come from the cuBLAS fallback: the profiler shows which kernel ran."""
    if rows > 2 and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the tensor-core kernel is sm_90a only")
    monkeypatch.setenv("FLASHCORE_GROUPED_LINEAR_KERNEL", "tensor_core")
    x, weights, biases = make(generator, torch.bfloat16, rows, 4096, [1024, 512], True)
    grouped_linear(x, weights, biases)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        grouped_linear(x, weights, biases)
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    assert sum(kernel + "<" in name or name.startswith(kernel) for name in names) == 1, names


@pytest.mark.parametrize("ns, kernel", [([4096, 1024, 1024], "grouped_linear_wgmma_kernel"), ([4096], None),
                                        ([14336, 14336], None)])
def test_default_choice_for_several_tokens(ns, kernel, generator):
    """Without the switch, 3-64 tokens: the tensor-core kernel for 3+ weights (q/k/v), cuBLAS for one or two weights
    (grouped_linear_prefers_kernel's measured rule)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the tensor-core kernel is sm_90a only")
    x, weights, biases = make(generator, torch.bfloat16, 24, 4096, ns, False)
    grouped_linear(x, weights, biases)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        outs = grouped_linear(x, weights, biases)
        torch.cuda.synchronize()
    ours = sum("grouped_linear" in event.name for event in prof.events())
    assert ours == (1 if kernel else 0), [event.name for event in prof.events()]
    for out, w in zip(outs, weights):
        torch.testing.assert_close(out, F.linear(x, w), rtol=2e-2, atol=2e-2)
