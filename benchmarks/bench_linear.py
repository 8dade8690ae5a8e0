"""The linear layers of a decode step: flashcore::grouped_linear's kernels (one launch per group of weights sharing
an input: the GEMV at 1-2 tokens, the sm_90a tensor-core kernel at 3-64, forced on for every group here with
FLASHCORE_GROUPED_LINEAR_KERNEL=tensor_core, whatever the op would choose by default) against torch's linear (cuBLAS)
once per weight, as inductor runs them in a compiled decode step.

Llama-3-8B's layer shapes (hidden 4096, 32/8 heads of 128, MLP 14336, vocabulary 128256), bf16, m = 1 to 64
tokens: q/k/v (three weights, one input), o, gate/up (two), down, lm_head. Each variant runs over --copies distinct
copies of its weights (fewer for the lm_head, ~3 GB in all), one after the other in one CUDA graph, as a decode step
runs its layers: every copy is read cold from HBM (the copies together are far larger than L2), launch overhead is
what a step's graph pays, and the replay is timed by triton's do_bench (median) and divided by the copies, so the L2
flush do_bench makes before each replay costs a copy ~1 us instead of the ~10 us it adds to a single call.
TB/s counts the weight bytes read once.
Writes bench_linear.csv under $OUT (or ./benchmark_results) and prints a table last.

    python benchmarks/bench_linear.py [--rows 1 2 8 32 64] [--copies 8]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, graph_of, median_ms, print_table, write_csv  # noqa: E402

from flashcore_hf.ops import grouped_linear  # noqa: E402

HIDDEN, HEAD_DIM, Q_HEADS, KV_HEADS, MLP, VOCAB = 4096, 128, 32, 8, 14336, 128256
GROUPS = {  # name -> (input features, output features of each weight)
    "q/k/v": (HIDDEN, [Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]),
    "o": (Q_HEADS * HEAD_DIM, [HIDDEN]),
    "gate/up": (HIDDEN, [MLP, MLP]),
    "down": (MLP, [HIDDEN]),
    "lm_head": (HIDDEN, [VOCAB]),
}


def replay_of(fn):
    """fn captured in a CUDA graph (common.graph_of): its replay; a capture failure stops the benchmark."""
    replay, why = graph_of(fn)
    if replay is None:
        raise RuntimeError(f"CUDA graph capture failed: {why}")
    return replay


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--copies", type=int, default=8, help="distinct weight copies per timed graph")
    args = parser.parse_args()
    dtype, rows_out = torch.bfloat16, []
    os.environ["FLASHCORE_GROUPED_LINEAR_KERNEL"] = "tensor_core"   # our kernels for every row, cuBLAS or not
    layer_us = {}
    for rows in args.rows:
        for name, (k, ns) in GROUPS.items():
            weight_bytes = sum(n * k * 2 for n in ns)
            copies = max(2, min(args.copies, int(3e9 // weight_bytes)))
            sets = [[torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for n in ns] for _ in range(copies)]
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            cublas = replay_of(lambda x=x, sets=sets: [F.linear(x, w) for weights in sets for w in weights])
            grouped = replay_of(lambda x=x, sets=sets: [grouped_linear(x, weights) for weights in sets])
            for out, w in zip(grouped_linear(x, sets[0]), sets[0]):   # same numbers (up to summation order)
                torch.testing.assert_close(out, F.linear(x, w), rtol=2e-2, atol=2e-2)
            t_cublas = median_ms(cublas) * 1e3 / copies
            t_grouped = median_ms(grouped) * 1e3 / copies
            row = dict(rows=rows, weights=name, MB=weight_bytes / 1e6, copies=copies, cublas_us=t_cublas,
                       grouped_us=t_grouped, cublas_TBps=weight_bytes / t_cublas / 1e6,
                       grouped_TBps=weight_bytes / t_grouped / 1e6, speedup=t_cublas / t_grouped)
            rows_out.append(row)
            if name != "lm_head":
                layer_us.setdefault(rows, [0.0, 0.0])
                layer_us[rows][0] += t_cublas
                layer_us[rows][1] += t_grouped
        torch.cuda.empty_cache()
    for rows, (t_cublas, t_grouped) in layer_us.items():
        rows_out.append(dict(rows=rows, weights="one layer (all but lm_head)", cublas_us=t_cublas,
                             grouped_us=t_grouped, speedup=t_cublas / t_grouped))
    path = write_csv(rows_out, "bench_linear.csv")
    print(f"\n{device_name()}, bf16; CSV: {path}")
    print_table(rows_out, ["rows", "weights", "MB", "cublas_us", "grouped_us", "cublas_TBps", "grouped_TBps",
                           "speedup"])


if __name__ == "__main__":
    main()
