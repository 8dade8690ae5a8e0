"""CPU: flashcore vs stock SDPA on the built-in example model, plus op-level rows, all measured in one run.

Model: the built-in random Llama of examples/long_context_generate.py (4 layers, hidden 256, 8 query / 2 KV heads
of head dim 32), float32, seeded weights, torch.set_num_threads(2). For each context (default 2K, 4K, 8K) and path:
  flashcore: attn_implementation="flashcore" with generate()'s default PagedKVCache
  sdpa:      attn_implementation="sdpa" with DynamicCache
rows report
  prefill_s      median over --prefill-runs of generate(max_new_tokens=1): call start to the first logits
  decode_tok_s   1 / median per-step time over --decode-runs greedy generate() calls of --new tokens
  e2e_s          median wall time of those calls (prefill + --new tokens)
Each path first generates 2 tokens from a 64-token prompt (warm-up); prefill and decode runs alternate between the paths. Op-level rows time flashcore.paged_attention
against torch SDPA (enable_gqa) on the same dense data: a causal prefill shape and a one-query decode shape
(median of --op-reps calls after warm-up). The table comes last; the CSV goes to benchmark_results/bench_cpu.csv.

    python benchmarks/bench_cpu.py                              # about 5-8 minutes on 2 cores
    python benchmarks/bench_cpu.py --contexts 2048 --paths flashcore sdpa --new 32
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
from common import print_table, write_csv  # noqa: E402

import flashcore_hf  # noqa: E402  (registers attn_implementation="flashcore")
from long_context_generate import builtin_config  # noqa: E402
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList  # noqa: E402

PATHS = ("flashcore", "sdpa")


class StepClock(LogitsProcessor):
    """Timestamps every forward of a generate() call (the logits processor runs right after each)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def generate(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """(call start, per-forward timestamps) of one greedy generate()."""
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    end = time.perf_counter()
    return start, clock.times + [end]


def model_rows(model, context: int, args) -> list[dict]:
    """Rows of every path at one context. Runs alternate between the paths (prefill k of flashcore, of sdpa, then
    k + 1, ...) so that a drift in machine load hits both alike."""
    generator = torch.Generator().manual_seed(args.seed + context)
    input_ids = torch.randint(1, model.config.vocab_size, (1, context), generator=generator)
    prefill = {path: [] for path in args.paths}
    for path in args.paths:
        model.set_attn_implementation(path)
        generate(model, input_ids[:, :64], 2)  # warm-up: thread pool, allocator, first-call costs
    for _ in range(args.prefill_runs):
        for path in args.paths:
            model.set_attn_implementation(path)
            start, times = generate(model, input_ids, 1)
            prefill[path].append(times[0] - start)
            gc.collect()
    decode = {path: {"steps": [], "e2e": []} for path in args.paths}
    load = os.getloadavg()[0]
    for _ in range(args.decode_runs):
        for path in args.paths:
            model.set_attn_implementation(path)
            start, times = generate(model, input_ids, args.new)
            decode[path]["steps"] += [b - a for a, b in zip(times[:-2], times[1:-1])]  # forward k+1 - forward k
            decode[path]["e2e"].append(times[-1] - start)
            gc.collect()
    rows = []
    for path in args.paths:
        step_s = statistics.median(decode[path]["steps"])
        rows.append({"case": f"model {context // 1024}K", "path": path, "context": context,
                     "prefill_s": statistics.median(prefill[path]), "prefill_min_s": min(prefill[path]),
                     "decode_tok_s": 1.0 / step_s, "decode_ms_step": step_s * 1e3,
                     "e2e_s": statistics.median(decode[path]["e2e"]), "new_tokens": args.new, "load_avg_1m": load})
    return rows


def median_s(fns, reps: int, warmup: int = 2) -> list[float]:
    """Median seconds of each fn, the calls alternating between them."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def op_rows(args) -> list[dict]:
    """paged_attention vs torch SDPA on the same dense data (the model's heads, float32, page size 64)."""
    hq, hkv, d, page = 8, 2, 32, 64
    rows = []
    cases = [("prefill", n, n) for n in args.op_prefill] + [("decode", 1, n) for n in args.op_decode]
    for kind, n_q, n_k in cases:
        g = torch.Generator().manual_seed(args.seed)
        q = torch.randn(1, hq, n_q, d, generator=g)
        k = torch.randn(1, hkv, n_k, d, generator=g)
        v = torch.randn(1, hkv, n_k, d, generator=g)
        # Pages of the same keys: [n_k / page, page, Hkv, D], sequence order.
        n_pages = -(-n_k // page)
        pad = n_pages * page - n_k
        k_pool = F.pad(k[0].transpose(0, 1), (0, 0, 0, 0, 0, pad)).reshape(n_pages, page, hkv, d).contiguous()
        v_pool = F.pad(v[0].transpose(0, 1), (0, 0, 0, 0, 0, pad)).reshape(n_pages, page, hkv, d).contiguous()
        counts = torch.full((n_pages,), page, dtype=torch.int32)
        counts[-1] = page - pad
        layout = flashcore_hf.PageLayout(torch.tensor([0, n_pages], dtype=torch.int32),
                                         torch.arange(n_pages, dtype=torch.int32), counts,
                                         torch.full((n_pages,), -1, dtype=torch.int32))
        q_packed = q[0].transpose(0, 1).contiguous()  # [n_q, Hq, D]
        q_indptr = torch.tensor([0, n_q], dtype=torch.int32)
        causal = kind == "prefill"

        def flashcore():
            return flashcore_hf.paged_attention(q_packed, k_pool, v_pool, layout, q_indptr, causal=causal,
                                                max_q_len=n_q, max_pages_per_seq=n_pages)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        with torch.inference_mode():
            err = (flashcore().transpose(0, 1)[None] - sdpa()).abs().max().item()
            reps = args.op_reps if kind == "prefill" else 10 * args.op_reps
            t_fc, t_sdpa = median_s([flashcore, sdpa], reps)
        flops = 4 * hq * d * n_q * n_k / (2 if causal and n_q == n_k else 1)
        for path, t in (("flashcore", t_fc), ("sdpa", t_sdpa)):
            rows.append({"case": f"op {kind} {n_q}x{n_k}", "path": path, "context": n_k, "op_ms": t * 1e3,
                         "gflops": flops / t / 1e9, "max_abs_err": err})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="*", default=[2048, 4096, 8192])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--new", type=int, default=64, help="greedy new tokens of the decode / e2e run")
    parser.add_argument("--prefill-runs", type=int, default=5)
    parser.add_argument("--decode-runs", type=int, default=3, help="greedy generate() runs per path, alternating")
    parser.add_argument("--op-prefill", type=int, nargs="*", default=[4096], help="op-level prefill lengths")
    parser.add_argument("--op-decode", type=int, nargs="*", default=[8192], help="op-level decode key counts")
    parser.add_argument("--op-reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default="bench_cpu.csv")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"flashcore_hf from {Path(flashcore_hf.__file__).parent}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"load average {os.getloadavg()[0]:.2f} (other processes on this machine skew every number)")
    rows = op_rows(args)
    for r in rows:
        print(r, flush=True)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(builtin_config(max(args.contexts, default=2048), args.new), dtype=torch.float32,
                                             attn_implementation="flashcore").eval()
    model.generation_config.eos_token_id = None
    for context in args.contexts:
        for row in model_rows(model, context, args):
            print(row, flush=True)
            rows.append(row)
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["path"]] = r
    for r in rows:  # flashcore relative to SDPA in the same run
        ref = by_case[r["case"]].get("sdpa")
        if r["path"] == "flashcore" and ref is not None:
            for key in ("prefill_s", "op_ms"):
                if key in r:
                    r[f"{key.split('_')[0]}_vs_sdpa"] = r[key] / ref[key]
            if "decode_tok_s" in r:
                r["decode_vs_sdpa"] = r["decode_tok_s"] / ref["decode_tok_s"]
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    path = write_csv(rows, args.csv)
    print(f"\nCSV: {path}\n")
    print_table(rows, ["case", "path", "prefill_s", "prefill_vs_sdpa", "decode_tok_s", "decode_vs_sdpa", "e2e_s",
                       "op_ms", "op_vs_sdpa", "gflops", "max_abs_err"])


if __name__ == "__main__":
    main()
