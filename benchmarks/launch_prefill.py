"""Run the planned prefill op a few times on one shape, for a profiler to pick one launch (no timing of its own).

Hq32 / Hkv8, D128, bf16, causal, page 128, pages in random order (bench_prefill.paged_copy); B sequences of S tokens.

    ncu --set full -k regex:prefill_sm90 --launch-skip 2 --launch-count 1 -o b4_s4096 \\
        python benchmarks/launch_prefill.py 4 4096
    ncu --import b4_s4096.ncu-rep --page details
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prefill import paged_copy  # noqa: E402

import flashcore_hf as fc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("batch", type=int)
    parser.add_argument("seq_len", type=int)
    parser.add_argument("--launches", type=int, default=4)
    args = parser.parse_args()
    B, S = args.batch, args.seq_len
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B * S, 32, 128, generator=gen).bfloat16().cuda()
    k = torch.randn(B, S, 8, 128, generator=gen).bfloat16().cuda()
    v = torch.randn(B, S, 8, 128, generator=gen).bfloat16().cuda()
    k_cache, v_cache, layout = paged_copy(k, v, 128, gen)
    q_indptr = (torch.arange(B + 1, dtype=torch.int32) * S).cuda()
    plan = fc.plan_attention(layout, q_indptr, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=128,
                             dtype=q.dtype, total_q=B * S, causal=True)
    for _ in range(args.launches):
        plan.run(q, k_cache, v_cache, layout, q_indptr)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
