"""CUDA flashcore::grouped_linear: the GEMV kernel (x of at most 2 tokens) against a float64 reference, held to
cuBLAS's error on the same inputs (3 and 4 tokens take torch's linear); the paths that fall back to torch's linear;
CUDA-graph replay."""
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
                                   (2056, [5, 7, 11, 13])])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_float64_within_cublas_error(dtype, rows, k, ns, bias, generator):
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


def test_leading_dims_and_strided_rows(generator):
    """x [2, 1, k] (a decode step's hidden states) and a row-strided x view give the same as a contiguous x."""
    x, weights, biases = make(generator, torch.bfloat16, 2, 256, [40, 24], True)
    base = grouped_linear(x, weights, biases)
    for out, want in zip(grouped_linear(x.view(2, 1, 256), weights, biases), base):
        assert out.shape == (2, 1, want.shape[-1])
        torch.testing.assert_close(out.view_as(want), want, rtol=0, atol=0)
    wide = torch.zeros(2, 512, dtype=torch.bfloat16, device=DEV)
    wide[:, :256] = x
    for out, want in zip(grouped_linear(wide[:, :256], weights, biases), base):
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


def test_cuda_graph_replay(generator):
    x, weights, biases = make(generator, torch.bfloat16, 1, 4096, [1024, 512], False)
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
