"""Run one prefill attention shape a few times for a profiler to pick one launch (no timing of its own): our planned
op over pages, or SDPA's cuDNN backend on a dense copy (K/V expanded to the query heads, as bench_prefill.py and
stock transformers do), for counting both kernels under the same profiler.

Hq32 / Hkv8, D128, bf16, causal by default (`--heads 16 16 --head-dim 64 --dtype float16 --no-causal`: the D64 seed
row), pages in random order (bench_prefill.paged_copy); B sequences of S tokens. The launches after the first
(warm-up) run inside a CUDA profiler range, so `--profile-from-start off` skips the setup.

    ncu --set full -k regex:prefill_sm90 --launch-skip 2 --launch-count 1 -o b4_s4096 \\
        python benchmarks/launch_prefill.py 4 4096
    ncu --import b4_s4096.ncu-rep --page details
    ncu --profile-from-start off --launch-count 1 --metrics smsp__inst_executed.sum,lts__t_bytes.sum,dram__bytes.sum \\
        python benchmarks/launch_prefill.py 1 32768 --impl cudnn
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prefill import paged_copy  # noqa: E402

import flashcore_hf as fc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("batch", type=int)
    parser.add_argument("seq_len", type=int)
    parser.add_argument("--launches", type=int, default=4)
    parser.add_argument("--impl", choices=["flashcore", "cudnn"], default="flashcore")
    parser.add_argument("--page-size", type=int, default=128)
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    args = parser.parse_args()
    B, S, D = args.batch, args.seq_len, args.head_dim
    Hq, Hkv = args.heads
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B * S, Hq, D, generator=gen).to(dtype).cuda()
    k = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).cuda()
    v = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).cuda()
    if args.impl == "flashcore":
        k_cache, v_cache, layout = paged_copy(k, v, args.page_size, gen)
        q_indptr = (torch.arange(B + 1, dtype=torch.int32) * S).cuda()
        plan = fc.plan_attention(layout, q_indptr, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                                 page_size=args.page_size, dtype=q.dtype, total_q=B * S, causal=args.causal)

        def run():
            plan.run(q, k_cache, v_cache, layout, q_indptr)
    else:
        qd = q.view(B, S, Hq, D).transpose(1, 2).contiguous()
        kd, vd = (t.repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2).contiguous() for t in (k, v))

        def run():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(qd, kd, vd, is_causal=args.causal)
    run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _ in range(args.launches - 1):
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
