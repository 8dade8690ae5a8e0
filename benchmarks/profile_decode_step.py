"""Where a graph-captured decode step's time goes: GPU replay alone vs the host work around it.

Runs generate() on the Llama-3-8B-shaped random model (as bench_e2e.py) with CUDA graphs, then reports per decode
step: the whole step as generate() sees it, the host time of the flashcore runner's parts (planning, loading the
fixed buffers, launching the replay) and the GPU time of the replay alone (CUDA events over repeated replays).

    python benchmarks/profile_decode_step.py --case 1x32768
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import CASES, build_model  # noqa: E402
from common import print_table  # noqa: E402

import flashcore_hf  # noqa: E402
from flashcore_hf.hf import decode_graphs  # noqa: E402
from flashcore_hf.cache import PagedKVCache  # noqa: E402

HOST = defaultdict(float)


def timed(cls, name, key):
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            HOST[key] += time.perf_counter() - t0

    setattr(cls, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", nargs="+", default=["1x32768", "64x1024"],
                        choices=[c for c in CASES if "samples" not in c])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    model = build_model(args.layers)
    model.set_attn_implementation("flashcore")
    timed(PagedKVCache, "plan_decode_step", "plan (allocate + page lists)")
    timed(decode_graphs._FixedStep, "load", "load fixed buffers")
    timed(decode_graphs.DecodeGraphRunner, "_eligible", "eligibility check")
    timed(torch.cuda.CUDAGraph, "replay", "graph launch (host)")
    timed(decode_graphs.DecodeGraphRunner, "__call__", "runner total (host)")
    rows = []
    for case in args.case:
        batch, prompt = CASES[case]
        distinct = 1 if case.endswith("same") else batch    # "...same": copies of one prompt (shared pages)
        ids = torch.randint(1, model.config.vocab_size, (distinct, prompt), device="cuda").expand(batch, -1)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)  # capture
            HOST.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            HOST.clear()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
            torch.cuda.synchronize()
            steps = args.new - 1
            per_step = (time.perf_counter() - t0 - prefill) / steps
        runner = model.__dict__["forward"]
        step = next(reversed(runner._graphs.values()))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        step.graph.replay()
        start.record()
        for _ in range(20):
            step.graph.replay()
        end.record()
        end.synchronize()
        gpu_ms = start.elapsed_time(end) / 20
        row = {"case": case, "step_ms": per_step * 1e3, "gpu_replay_ms": gpu_ms}
        row.update({k: v / steps * 1e3 for k, v in HOST.items()})
        row["hf_generate_other_ms"] = row["step_ms"] - gpu_ms - row.get("runner total (host)", 0)
        rows.append(row)
        print(row, flush=True)
        flashcore_hf.release_decode_graphs(model)
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
