"""Decode attention benchmark: flashcore paged decode vs SDPA (flash, cuDNN) on dense copies of the same data.

Shape: Hq 32 / Hkv 8, head dim 128, bf16, one query per sequence; page sizes 16 and 128 (pages scattered by a
permutation); batch {1, 16, 64} x context {8K, 32K, 128K}. Median of triton's do_bench (L2 flushed before every
run). TB/s counts the K and V bytes that must be read (every key of every sequence once).
Two flashcore columns per page size: `fc` is the public op exactly as the README calls it (metadata on the GPU, no
hints: a shape-only plan every call), `plan` is plan_attention once (exact, from host copies) and AttentionPlan.run.
Writes decode.csv and decode.png under $OUT (or ./benchmark_results) and prints a table last.

    python benchmarks/bench_decode.py [--quick]
    python benchmarks/bench_decode.py --profile      # per-kernel device time (torch.profiler) for small batches
    python benchmarks/bench_decode.py --one 1 8192 16  # just flashcore at B, context, page size (for ncu)
    python benchmarks/bench_decode.py --softcap        # cost of logit softcapping and sinks (decode_softcap.csv)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, kernels_of, median_ms, output_dir, print_table, write_csv  # noqa: E402

import flashcore_hf as fc  # noqa: E402

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16


def exact_plan(layout, q_indptr, page_size, softcap=None):
    """plan_attention once, from host copies of the offsets (exact bounds)."""
    return fc.plan_attention(layout, q_indptr, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=page_size,
                             dtype=DTYPE, softcap=softcap,
                             host_metadata=(layout.row_offsets.cpu(), q_indptr.cpu()))


def make_paged(batch, ctx, page_size, gen):
    """Scattered page pool holding `batch` sequences of `ctx` keys; returns caches, layout, q, dense K/V views."""
    pages_per_seq = ctx // page_size
    num_pages = batch * pages_per_seq
    k_cache = torch.randn(num_pages, page_size, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    v_cache = torch.randn(num_pages, page_size, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    cols = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    counts = torch.full_like(cols, page_size)
    row_offsets = torch.arange(0, num_pages + 1, pages_per_seq, device="cuda", dtype=torch.int32)
    layout = fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    q_indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    return k_cache, v_cache, layout, q, q_indptr, pages_per_seq


def dense_copy(cache, layout, batch):
    """[B, Hkv, S, D] contiguous copy of each sequence's keys, in order."""
    return cache[layout.cols.long()].view(batch, -1, HKV, D).transpose(1, 2).contiguous()


def time_sdpa(backend, q, k, v):
    """Median ms of SDPA with one backend; GQA through enable_gqa, else KV expanded to Hq heads (noted)."""
    qd = q[:, :, None, :]  # [B, Hq, 1, D]
    with sdpa_kernel([backend]):
        try:
            F.scaled_dot_product_attention(qd, k, v, enable_gqa=True)
            return median_ms(lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True)), "gqa"
        except RuntimeError:
            pass
        need = k.numel() * k.element_size() * 2 * (HQ // HKV)
        if need > torch.cuda.mem_get_info()[0] * 0.8:
            return float("nan"), "refused GQA; expanded KV does not fit"
        ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        try:
            ms = median_ms(lambda: F.scaled_dot_product_attention(qd, ke, ve))
        except RuntimeError as err:
            return float("nan"), f"refused: {str(err).splitlines()[0][:60]}"
        del ke, ve
        return ms, "expanded KV (refused enable_gqa)"


def profile_kernels(cases, iters=20):
    """Average device time per kernel (CUPTI through torch.profiler) of flashcore and SDPA cuDNN, no L2 flush."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    for batch, ctx, page_size in cases:
        k_cache, v_cache, layout, q, q_indptr, pps = make_paged(batch, ctx, page_size, gen)
        plan = exact_plan(layout, q_indptr, page_size)
        kd, vd = dense_copy(k_cache, layout, batch), dense_copy(v_cache, layout, batch)
        fns = {
            "flashcore": lambda: plan.run(q, k_cache, v_cache, layout, q_indptr),
            "cudnn": lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd, enable_gqa=True),
        }
        for name, fn in fns.items():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                kernels = kernels_of(fn, calls=iters, warmup=3)
            for kernel, launches, us in kernels:
                if launches >= 1:  # every call's kernels (not a one-off)
                    print(f"B{batch} x {ctx} p{page_size} {name:9s} {kernel[:90]:90s} "
                          f"{us / launches:8.1f} us x {launches:.0f}", flush=True)
        del k_cache, v_cache, kd, vd, plan
        torch.cuda.empty_cache()


SOFTCAP_SHAPES = [(1, 32768, 16), (64, 8192, 16)]  # split page lists (+ merge kernel); one split per sequence
SOFTCAP = 30.0


def softcap_cost(shapes=SOFTCAP_SHAPES):
    """flashcore alone, in one run: plain, softcap, sinks and both, for each (B, context, page size); median us and
    the ratio to plain. Softcap switches to the kernels' softcap instantiations; sinks only touch the epilogue."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows = []
    for batch, ctx, page_size in shapes:
        k_cache, v_cache, layout, q, q_indptr, pps = make_paged(batch, ctx, page_size, gen)
        sinks = torch.randn(HQ, device="cuda", generator=gen)
        kv_bytes = 2 * batch * ctx * HKV * D * torch.finfo(DTYPE).bits // 8
        row = {"gpu": device_name(), "batch": batch, "context": ctx, "page": page_size}
        for name, softcap, sink in (("plain", None, None), ("softcap", SOFTCAP, None), ("sinks", None, sinks),
                                    ("softcap_sinks", SOFTCAP, sinks)):
            plan = exact_plan(layout, q_indptr, page_size, softcap)
            run = lambda: plan.run(q, k_cache, v_cache, layout, q_indptr, sinks=sink)  # noqa: E731
            run()
            row[f"{name}_us"] = median_ms(run) * 1e3
            row[f"{name}_TBs"] = kv_bytes / (row[f"{name}_us"] * 1e-6) / 1e12
        for name in ("softcap", "sinks", "softcap_sinks"):
            row[f"{name}_vs_plain"] = row[f"{name}_us"] / row["plain_us"]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del k_cache, v_cache, layout, plan
        torch.cuda.empty_cache()
    print(f"wrote {write_csv(rows, 'decode_softcap.csv')}")
    print_table(rows, ["batch", "context", "page", "plain_us", "softcap_us", "sinks_us", "softcap_sinks_us",
                       "softcap_vs_plain", "sinks_vs_plain", "softcap_sinks_vs_plain"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="only B in {1, 16} x context in {8K, 32K}")
    parser.add_argument("--profile", action="store_true", help="per-kernel device times for a few cases")
    parser.add_argument("--one", type=int, nargs=3, metavar=("B", "CTX", "PAGE"), help="run only flashcore, 10x")
    parser.add_argument("--softcap", action="store_true",
                        help=f"only the cost of softcap {SOFTCAP} and sinks at (B, context, page) {SOFTCAP_SHAPES}")
    args = parser.parse_args()
    if args.softcap:
        softcap_cost()
        return
    if args.profile:
        profile_kernels([(1, 8192, 16), (1, 8192, 128), (1, 32768, 16), (1, 131072, 16), (16, 32768, 16)])
        return
    if args.one:
        batch, ctx, page_size = args.one
        k_cache, v_cache, layout, q, q_indptr, pps = make_paged(batch, ctx, page_size,
                                                                torch.Generator(device="cuda").manual_seed(2))
        for _ in range(10):
            fc.paged_attention(q, k_cache, v_cache, layout, q_indptr)
        torch.cuda.synchronize()
        return
    batches = [1, 16] if args.quick else [1, 16, 64]
    contexts = [8192, 32768] if args.quick else [8192, 32768, 131072]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for batch in batches:
        for ctx in contexts:
            kv_bytes = 2 * batch * ctx * HKV * D * torch.finfo(DTYPE).bits // 8
            # pool (K+V) + dense copies (K+V) for the SDPA baselines
            if 2 * kv_bytes > torch.cuda.mem_get_info()[0] * 0.85:
                print(f"skip B{batch} x {ctx}: {2 * kv_bytes / 2**30:.0f} GiB does not fit", flush=True)
                continue
            row = {"gpu": device_name(), "batch": batch, "context": ctx, "kv_GB": kv_bytes / 1e9}
            k_dense = v_dense = None
            for page_size in (16, 128):
                k_cache, v_cache, layout, q, q_indptr, pps = make_paged(batch, ctx, page_size, gen)
                plan = exact_plan(layout, q_indptr, page_size)
                readme_call = lambda: fc.paged_attention(q, k_cache, v_cache, layout, q_indptr)  # noqa: E731
                planned = lambda: plan.run(q, k_cache, v_cache, layout, q_indptr)  # noqa: E731
                for name, run in (("fc", readme_call), ("plan", planned)):
                    run()
                    ms = median_ms(run)
                    row[f"{name}_p{page_size}_us"] = ms * 1e3
                    row[f"{name}_p{page_size}_TBs"] = kv_bytes / (ms * 1e-3) / 1e12
                row[f"p{page_size}_nohint_vs_plan"] = row[f"plan_p{page_size}_us"] / row[f"fc_p{page_size}_us"]
                if page_size == 128:  # dense copies of the same data for SDPA
                    k_dense, v_dense = dense_copy(k_cache, layout, batch), dense_copy(v_cache, layout, batch)
                    qd = q
                del k_cache, v_cache, layout, plan
                torch.cuda.empty_cache()
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                ms, note = time_sdpa(backend, qd, k_dense, v_dense)
                row[f"sdpa_{name}_us"] = ms * 1e3
                row[f"sdpa_{name}_TBs"] = kv_bytes / (ms * 1e-3) / 1e12
                row[f"sdpa_{name}_note"] = note
            row["p128_vs_cudnn"] = row["sdpa_cudnn_us"] / row["fc_p128_us"]
            row["p16_vs_cudnn"] = row["sdpa_cudnn_us"] / row["fc_p16_us"]
            row["p16_vs_p128"] = row["fc_p128_us"] / row["fc_p16_us"]
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del k_dense, v_dense, qd
            torch.cuda.empty_cache()

    csv_path = write_csv(rows, "decode.csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"B{r['batch']}x{r['context'] // 1024}K" for r in rows]
        xs = range(len(rows))
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for key, label in (("fc_p16_TBs", "flashcore page 16"), ("fc_p128_TBs", "flashcore page 128"),
                           ("sdpa_flash_TBs", "SDPA flash (dense)"), ("sdpa_cudnn_TBs", "SDPA cuDNN (dense)")):
            ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("TB/s (K+V bytes / median time)")
        ax.set_title(f"Decode, Hq{HQ}/Hkv{HKV} D{D} bf16, one query per sequence ({device_name()})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir() / "decode.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"wrote {csv_path}")
    print_table(rows, ["batch", "context", "fc_p16_us", "plan_p16_us", "fc_p128_us", "plan_p128_us",
                       "sdpa_cudnn_us", "fc_p128_TBs", "sdpa_flash_TBs", "sdpa_cudnn_TBs", "p128_vs_cudnn",
                       "p16_vs_p128", "p16_nohint_vs_plan", "p128_nohint_vs_plan"])


if __name__ == "__main__":
    main()
