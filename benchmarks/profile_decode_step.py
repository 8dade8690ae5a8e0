"""Where a graph-captured decode step's time goes: GPU replay alone vs the host work around it, kernels per step, and
the distance to the memory-bandwidth floor, for the compiled decode step and the uncompiled one.

Runs generate() on the Llama-3-8B-shaped random model (as bench_e2e.py) with CUDA graphs, once per --compile setting
(on: the torch.compile'd step, flashcore_hf/hf/compiled_decode.py; off: set_compiled_decode(False)), then reports per
decode step:
- step_ms: the whole step as generate() sees it (median over the steps, between the syncs generate() makes every
  step), split into its parts on the host timeline: hf_before_ms (generate()'s own work from the previous step's
  sync to calling the model), runner_before_ms (flashcore's runner before the launch: eligibility, planning the
  step, loading the fixed buffers), launch_ms (the graph launch call) and after_launch_ms (launch to the sync: the
  replay and the few kernels generate() adds, with the host's work after the launch overlapped). The GPU idles
  during the parts before the launch. This timeline syncs every step, which keeps generate() from running a step
  ahead of the GPU (its default over a PagedKVCache on CUDA: decode_graphs.py); run_ahead_step_ms is the median step
  of a generate() without that sync (CUDA events behind each step, as bench_e2e.py times it), the step users get;
- gpu_replay_ms: the GPU time of the replay alone (CUDA events over repeated replays); gpu_single_replay_ms: one
  replay started on an idle GPU, as in a step;
- floor_ms / pct_of_floor: the bytes a step must read (every weight except the embedding table, of which a step reads
  B rows, plus the K/V pages in use) at --bandwidth-tbs (4.27 TB/s: the H200's measured copy ceiling,
  benchmarks/notes/decode_graphs.md), and floor_ms / gpu_replay_ms;
- kernels_per_step and the replay's GPU time by kind (torch.profiler over one replay: attention = flashcore's
  attention and selection kernels, gemm = cuBLAS/CUTLASS and flashcore's grouped linear kernels, fused = inductor's
  Triton kernels, other = everything else, e.g. eager elementwise kernels), and the kernels that take the most
  time. A kernel launched with PDL starts before its predecessor ends and its profiled time includes that wait, so
  the kinds can add up to more than the replay;
- with --trace, trace_<case>_<compile>_<policy>.csv (under $OUT or ./benchmark_results): every kernel of that replay in
  start order, its start and end (µs from the replay's first kernel) and the gap before it.
--policy runs each case once per sparse policy through the default cache (set_default_cache_options(page_size=64,
sparse=...) with bench_sparse.py's `sparse_config`, as its end-to-end rows; "dense": no selection).

    python benchmarks/profile_decode_step.py --case 1x32768 64x1024 --compile on off
    python benchmarks/profile_decode_step.py --case 1x131072 --compile on --policy dense topk --trace
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
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import CASES, StepProbe, build_model  # noqa: E402
from bench_sparse import sparse_config  # noqa: E402
from common import print_table, write_csv  # noqa: E402

import flashcore_hf  # noqa: E402
from flashcore_hf import CACHE_KWARG  # noqa: E402
from flashcore_hf.hf import decode_graphs  # noqa: E402
from flashcore_hf.cache import PagedKVCache  # noqa: E402

ATTENTION_KERNELS = (r"paged_|prefill_sm90|merge_s|append_kv|page_bounds|score_pages|score_sign|select_top|"
                     r"candidate_scores|key_positions")
KINDS = (("attention", re.compile(ATTENTION_KERNELS, re.I)),
         ("gemm", re.compile(r"gemm|gemv|grouped_linear|cutlass|cublas|xmma|nvjet|matmul|splitk", re.I)),
         ("fused", re.compile(r"triton_", re.I)))
"""Kernel kinds by name: flashcore's kernels (csrc/kernels/cuda), cuBLAS / CUTLASS GEMMs, inductor's Triton kernels."""
TOP_KERNELS = 15
"""Kernels listed by their GPU time in one replay."""


class Timeline:
    """Host timestamps of the points a decode step passes: the runner entered, the graph launch started and ended,
    and generate()'s per-step sync (a logits processor that syncs, as generate() does each step anyway)."""

    def __init__(self):
        self.points: list[tuple[str, float]] = []
        self.recording = False

    def mark(self, name: str) -> None:
        if self.recording:
            self.points.append((name, time.perf_counter()))

    def wrap(self, cls, method: str, before: str | None, after: str | None = None) -> None:
        original = getattr(cls, method)
        timeline = self

        def wrapper(*args, **kwargs):
            if before:
                timeline.mark(before)
            try:
                return original(*args, **kwargs)
            finally:
                if after:
                    timeline.mark(after)

        setattr(cls, method, wrapper)

    def step_parts(self) -> dict:
        """Median ms of each part over the replayed steps (a step: from one sync to the next, with one launch)."""
        parts = defaultdict(list)
        last = {}
        for name, t in self.points:
            if name == "synced" and {"synced", "enter", "launch", "launched"} <= last.keys() \
                    and last["synced"] < last["enter"] < last["launch"] < last["launched"]:
                parts["step_ms"].append(t - last["synced"])
                parts["hf_before_ms"].append(last["enter"] - last["synced"])
                parts["runner_before_ms"].append(last["launch"] - last["enter"])
                parts["launch_ms"].append(last["launched"] - last["launch"])
                parts["after_launch_ms"].append(t - last["launched"])
            last[name] = t
        return {key: 1e3 * statistics.median(values) for key, values in parts.items()}


class SyncProbe(LogitsProcessor):
    def __init__(self, timeline: Timeline):
        self.timeline = timeline

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.timeline.mark("synced")
        return scores


TIMELINE = Timeline()


def kernel_profile(graph: torch.cuda.CUDAGraph, trace_name: str | None = None) -> dict:
    """Kernels of one replay and their GPU time by kind (ms), from torch.profiler (CUPTI records graph kernels);
    trace_name: also write every kernel in start order to that CSV (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:    # older profilers keep device events only in the raw kineto results
        spans = sorted((e.start_ns() / 1e3, e.end_ns() / 1e3, e.name()) for e in prof.profiler.kineto_results.events()
                       if e.device_type() == torch.autograd.DeviceType.CUDA)
    kernels = [(name, end - start) for start, end, name in spans]
    if trace_name and spans:
        origin, previous_end, trace = spans[0][0], spans[0][0], []
        for start, end, name in spans:
            trace.append(dict(start_us=start - origin, end_us=end - origin, us=end - start,
                              gap_us=start - previous_end, name=name[:200]))
            previous_end = max(previous_end, end)
        print(f"kernel trace: {write_csv(trace, trace_name)}")
    row = {"kernels_per_step": 0, **{f"{kind}_ms": 0.0 for kind, _ in KINDS}, "other_ms": 0.0}
    by_name = defaultdict(lambda: [0, 0.0])
    for name, us in kernels:
        if re.search(r"memcpy|memset", name, re.I):
            continue
        row["kernels_per_step"] += 1
        kind = next((k for k, pattern in KINDS if pattern.search(name)), "other")
        row[f"{kind}_ms"] += us / 1e3
        by_name[name][0] += 1
        by_name[name][1] += us / 1e3
    if row["kernels_per_step"] == 0:
        print("warning: the profiler recorded no kernel of the replay (CUPTI without graph-node records?)")
    print("top kernels of one replay (count, ms, name):")
    for name, (count, ms) in sorted(by_name.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]:
        print(f"  {count:5d} {ms:8.3f}  {name[:150]}")
    return row


def floor_bytes(model, cache: PagedKVCache) -> int:
    """Bytes a decode step must read: the weights (without the embedding table) and the K/V pages in use."""
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.get_output_embeddings().weight.data_ptr() != embedding.data_ptr():   # untied: the table is not read
        weights -= embedding.numel() * embedding.element_size()
    return weights + cache.stats().bytes_used


def profile_case(model, case: str, compiled: bool, policy: str, args) -> dict:
    batch, prompt = CASES[case]
    flashcore_hf.set_compiled_decode(compiled)
    flashcore_hf.set_default_cache_options(page_size=64, sparse=sparse_config(policy, args.budget))
    distinct = 1 if case.endswith("same") else batch    # "...same": copies of one prompt (shared pages)
    ids = torch.randint(1, model.config.vocab_size, (distinct, prompt), device="cuda").expand(batch, -1)
    kwargs = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
    with torch.no_grad():
        model.generate(ids, **kwargs)                                                      # capture (and compile)
        probe = StepProbe(count_pools=False)
        torch.cuda.synchronize()
        probe.start()
        model.generate(ids, logits_processor=LogitsProcessorList([probe]), **kwargs)
        probe.finish()
        TIMELINE.points.clear()
        TIMELINE.recording = True
        # Last, so that the graph replayed below is this call's, over the cache `out` keeps alive.
        out = model.generate(ids, return_dict_in_generate=True, logits_processor=LogitsProcessorList(
            [SyncProbe(TIMELINE)]), **kwargs)
        TIMELINE.recording = False
        parts = TIMELINE.step_parts()
        parts["run_ahead_step_ms"] = 1e3 * statistics.median([b - a for a, b in zip(probe.times, probe.times[1:])])
    stats = flashcore_hf.decode_graph_stats(model)
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
    singles = []                           # one replay on an idle GPU, as in a step (launch latency included)
    for _ in range(10):
        torch.cuda.synchronize()
        start.record()
        step.graph.replay()
        end.record()
        end.synchronize()
        singles.append(start.elapsed_time(end))
    floor_ms = floor_bytes(model, getattr(out, CACHE_KWARG)) / (args.bandwidth_tbs * 1e12) * 1e3
    row = {"case": case, "compile": "on" if step.compiled else "off", "policy": policy, **parts, "gpu_replay_ms": gpu_ms,
           "gpu_single_replay_ms": statistics.median(singles), "floor_ms": floor_ms,
           "pct_of_floor": 100 * floor_ms / gpu_ms}
    row.update(kernel_profile(step.graph, f"trace_{case}_{row['compile']}_{policy}.csv" if args.trace else None))
    row.update(compiles=stats.compiles, compile_s=stats.compile_seconds, capture_s=stats.capture_seconds)
    if stats.compile_failures:
        row["compile_failures"] = "; ".join(stats.compile_failures)[:200]
    del out
    flashcore_hf.release_decode_graphs(model)
    flashcore_hf.set_compiled_decode(True)
    flashcore_hf.set_default_cache_options(sparse=flashcore_hf.SparseConfig())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", default=["1x32768", "64x1024"],
                        choices=[c for c in CASES if "samples" not in c and not c.endswith("doc8q")])
    parser.add_argument("--compile", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--policy", nargs="+", default=["dense"], choices=["dense", "streaming", "topk"],
                        help="sparse policies to run each case with (the default cache's SparseConfig)")
    parser.add_argument("--budget", type=int, default=4096, help="token budget of the sparse policies")
    parser.add_argument("--trace", action="store_true", help="write each profiled replay's kernel trace")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.27, help="memory bandwidth of the floor, TB/s")
    args = parser.parse_args()
    model = build_model(args.layers)
    model.set_attn_implementation("flashcore")
    TIMELINE.wrap(decode_graphs.DecodeGraphRunner, "_replay", before="enter")
    TIMELINE.wrap(torch.cuda.CUDAGraph, "replay", before="launch", after="launched")
    rows = []
    for case in args.case:
        for setting in args.compile:
            for policy in args.policy:
                row = profile_case(model, case, setting == "on", policy, args)
                rows.append(row)
                print(row, flush=True)
    path = write_csv(rows, "profile_decode_step.csv")
    columns = ["case", "compile", "policy", "run_ahead_step_ms", "step_ms", "hf_before_ms", "runner_before_ms", "launch_ms",
               "after_launch_ms", "gpu_replay_ms", "gpu_single_replay_ms", "floor_ms", "pct_of_floor", "kernels_per_step", "attention_ms",
               "gemm_ms", "fused_ms", "other_ms", "compiles", "compile_s"]
    print_table(rows, columns + [c for c in rows[0] if c not in columns])
    print(f"CSV: {path}")


if __name__ == "__main__":
    main()
