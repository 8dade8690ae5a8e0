"""Shared helpers for the benchmark scripts: median timing on the GPU, CSV and PNG output.

Benchmarks are scripts, not tests: they print a table with the references measured in the same run.
"""
from __future__ import annotations

import csv
import os
import statistics
from pathlib import Path

import torch


def median_ms(fn, *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median runtime of fn() in milliseconds (CUDA events via triton's do_bench when available)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except ImportError:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(5, int(rep_ms))):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def output_dir() -> Path:
    """$OUT when set (the GPU machine), else ./benchmark_results."""
    path = Path(os.environ.get("OUT") or "benchmark_results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(rows: list[dict], name: str) -> Path:
    path = output_dir() / name
    if not rows:
        return path
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Fixed-width table of the given columns (floats to 3 significant decimals)."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def kernels_of(fn, calls: int = 8, warmup: int = 1) -> list[tuple[str, float, float]]:
    """The CUDA kernels fn() launches, from torch.profiler over `calls` calls after `warmup` unprofiled ones (fn may
    be a CUDA graph's replay: CUPTI records graph kernels): (name, launches per call, GPU µs per call) by descending
    time; memcpy/memset included."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += 1
            totals[event.name][1] += event.device_time
    return sorted(((name, count / calls, us / calls) for name, (count, us) in totals.items()), key=lambda r: -r[2])


def graph_of(fn):
    """fn captured in a CUDA graph (warmed on a side stream first); returns graph.replay, or None with the reason."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, ""
    except RuntimeError as err:  # a host sync or an unsupported op inside: report it
        return None, str(err).splitlines()[0][:120]


class StepEvents:
    """Times of the steps of a generate() call on the GPU's clock, without a host sync per step (which would keep
    flashcore's generate() from running a step ahead of the GPU): `start()` after a sync, `mark()` after each step
    (a CUDA event behind the work queued so far), `times()` the marks' seconds from the start (syncs once)."""

    def __init__(self):
        self._start = torch.cuda.Event(enable_timing=True)
        self._marks: list[torch.cuda.Event] = []

    def start(self) -> None:
        self._start.record()

    def mark(self) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._marks.append(event)

    def times(self) -> list[float]:
        torch.cuda.synchronize()
        return [self._start.elapsed_time(event) / 1e3 for event in self._marks]
