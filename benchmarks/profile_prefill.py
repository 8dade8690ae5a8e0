"""Where a long prompt's prefill time goes: flashcore vs stock sdpa, kernel by kernel, in the same run.

Runs `generate(max_new_tokens=1)` (the prefill a user's generate() call makes, nothing else) on the
Llama-3-8B-shaped random model of bench_e2e.py, once per path after a warm call, and reports per path:
- wall_s: the call, synced (median of --repeats);
- gpu_s: the GPU time of all kernels of one profiled call (torch.profiler), split by kind: attention (flashcore's
  prefill / append kernels, or SDPA's flash / cuDNN / efficient kernels), gemm (cuBLAS / CUTLASS / nvjet), other
  (everything else: norms, rotary, activations, copies, the cache's own kernels);
- idle_s = wall_s - gpu_s: time the GPU spends without a kernel (host work, syncs, allocation);
- map_s / lease_s (flashcore): host seconds of the profiled call spent mapping page-pool memory
  (LayerPools.grow: cuMemCreate / cuMemMap / cuMemSetAccess) and handing the pool arena to the call's cache
  (PoolArena.lease: the previous call's pool memory is unmapped, after a device synchronize);
- the kernels that take the most GPU time.

    python benchmarks/profile_prefill.py --prompt 32768 131072 --paths sdpa flashcore
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import build_model  # noqa: E402
from common import print_table, write_csv  # noqa: E402

import flashcore_hf  # noqa: E402,F401  (registers attn_implementation="flashcore")
from flashcore_hf.cache.pools import LayerPools, PoolArena  # noqa: E402

KINDS = (("attention", re.compile(r"prefill_sm90|paged_|append_kv|merge_s|flash|fmha|cudnn|attention|sdpa", re.I)),
         ("gemm", re.compile(r"gemm|gemv|cutlass|cublas|xmma|nvjet|matmul|splitk", re.I)))
"""Kernel kinds by name (first match wins); the rest is "other"."""
TOP_KERNELS = 12


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def kernel_times(prof) -> dict[str, float]:
    """GPU seconds per kernel name over the profiled region."""
    times: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time / 1e6
    return times


class HostTimer:
    """Host seconds spent in some methods while active (the methods are wrapped, then restored)."""

    def __init__(self, targets: dict[str, tuple[type, str]]):
        self.targets = targets
        self.seconds = dict.fromkeys(targets, 0.0)
        self._saved = {}

    def __enter__(self):
        for name, (owner, attr) in self.targets.items():
            original = getattr(owner, attr)
            self._saved[name] = original

            def timed(*args, _original=original, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds[_name] += time.perf_counter() - start
            setattr(owner, attr, timed)
        return self

    def __exit__(self, *exc):
        for name, (owner, attr) in self.targets.items():
            setattr(owner, attr, self._saved[name])


def profile_path(model, path: str, prompt: int, repeats: int) -> tuple[dict, list[tuple[str, float]]]:
    model.set_attn_implementation(path)
    ids = torch.randint(1, model.config.vocab_size, (1, prompt), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(prompt))
    mask = torch.ones_like(ids)

    def call():
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)

    call()  # warm
    walls = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    timer = HostTimer({"map_s": (LayerPools, "grow"), "lease_s": (PoolArena, "lease")})
    with timer, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    times = kernel_times(prof)
    by_kind: dict[str, float] = defaultdict(float)
    for name, seconds in times.items():
        by_kind[kind_of(name)] += seconds
    wall, gpu = statistics.median(walls), sum(times.values())
    row = dict(path=path, prompt=prompt, wall_s=wall, gpu_s=gpu, idle_s=wall - gpu,
               attention_s=by_kind["attention"], gemm_s=by_kind["gemm"], other_s=by_kind["other"], **timer.seconds,
               kernels=sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
    top = sorted(times.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return row, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, nargs="+", default=[32768])
    parser.add_argument("--paths", nargs="+", default=["sdpa", "flashcore"], choices=["sdpa", "flashcore"])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build_model(args.layers)
    rows = []
    for prompt in args.prompt:
        for path in args.paths:
            row, top = profile_path(model, path, prompt, args.repeats)
            rows.append(row)
            print(f"\n{path} {prompt} tokens: top kernels (GPU s, kind)")
            for name, seconds in top:
                print(f"  {seconds:8.4f}  {kind_of(name):9s}  {name[:110]}")
    print()
    write_csv(rows, "profile_prefill.csv")
    print_table(rows, ["path", "prompt", "wall_s", "gpu_s", "idle_s", "map_s", "lease_s", "attention_s", "gemm_s",
                       "other_s", "kernels"])


if __name__ == "__main__":
    main()
