"""Short summary of a GPU check: the key columns of every benchmark CSV in a results folder.

    python benchmarks/summarize.py benchmark_results/gpu_check
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402

# CSV name -> (title, columns to show); columns missing from a CSV are skipped.
SUMMARIES = {
    "decode.csv": ("decode attention (Hq32/Hkv8 D128 bf16; TB/s = K+V bytes / median time)",
                   ["batch", "context", "fc_p16_TBs", "fc_p128_TBs", "sdpa_flash_TBs", "sdpa_cudnn_TBs",
                    "fc_p128_us", "p128_vs_cudnn", "p16_vs_p128"]),
    "bench_prefill.csv": ("prefill attention (TFLOP/s; causal counts half)",
                          ["shape", "flashcore_ps128_TF", "flashcore_ps16_TF", "sdpa_flash_TF", "sdpa_cudnn_TF",
                           "flex_TF", "ps128_vs_flash", "ps16_vs_flash"]),
    "bench_linear.csv": ("a decode step's linear layers: grouped kernels vs cuBLAS (8B shapes, bf16, graph replays)",
                         ["rows", "weights", "cublas_us", "grouped_us", "cublas_TBps", "grouped_TBps", "speedup"]),
    "bench_e2e.csv": ("generate() on a Llama-3-8B-shaped model",
                      ["case", "path", "prefill_s", "decode_tok_s", "ms_per_step", "peak_GiB", "speedup_vs_dynamic",
                       "memory_vs_dynamic", "error"]),
    "sparse_layer.csv": ("sparse page selection: attention per layer (B=1 x 128K, 4K-token budget)",
                         ["what", "gpu_us", "wall_us", "graph_us", "speedup_vs_dense", "note"]),
    "sparse_e2e.csv": ("sparse page selection: generate() decode on the Llama-3-8B-shaped model",
                       ["policy", "cuda_graphs", "budget", "prefill_s", "ms_per_step", "decode_tok_s",
                        "speedup_vs_dense_same_mode"]),
}


def _parse(value: str):
    try:
        return float(value) if "." in value or "e" in value else int(value)
    except ValueError:
        return value


def main(folder: str) -> None:
    root = Path(folder)
    for name, (title, columns) in SUMMARIES.items():
        path = root / name
        if not path.exists():
            print(f"\n-- {title}: no {name}")
            continue
        with open(path) as f:
            rows = [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
        present = [c for c in (columns or (rows[0].keys() if rows else [])) if any(c in r and r[c] != "" for r in rows)]
        print(f"\n-- {title}")
        print_table(rows, present)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmark_results/gpu_check")
