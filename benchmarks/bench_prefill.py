"""Prefill attention throughput: flashcore's paged CUDA kernel against SDPA (flash, cuDNN) and compiled FlexAttention.

Shapes (issues 4, 7, 14): B16 H16 S2048 D64 fp16 causal and non-causal; B1 Hq32/Hkv8 D128 bf16 causal at S 8K, 32K,
64K and 128K; B4 x 4K Hq32/Hkv8 D128 bf16 causal; a chunked prefill (4K queries after a 28K cached prefix, causal
bottom-right: SDPA gets causal_lower_right). flashcore reads K/V from a paged cache (pages scattered by a random
permutation) at page sizes 128, 64 and 16 with its default kernel choice (the wgmma kernel on an H100/H200 at head dims
64 and 128), and at page size 128 once more with FLASHCORE_PREFILL_KERNEL=mma (column flashcore_mma_ps128_TF). The
references run on dense contiguous [B, H, S, D] copies (SDPA with K/V expanded to Hq heads, as in ANCHORS.md;
FlexAttention with enable_gqa and a causal block mask, skipped above 32K keys where building the mask takes too
long), all in the same run.
TFLOP/s counts 4 * B * Hq * S^2 * D, halved for causal (chunked prefill: 4 * B * Hq * D per visible (query, key)
pair). Writes bench_prefill.csv and bench_prefill.png under $OUT (or ./benchmark_results) and prints a table last.

    python benchmarks/bench_prefill.py [--quick] [--no-refs] [--only TEXT] [--rounds N]
    python benchmarks/bench_prefill.py --softcap   # cost of logit softcapping and sinks (bench_prefill_softcap.csv)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, median_ms, output_dir, print_table, write_csv  # noqa: E402

import flashcore_hf as fc  # noqa: E402

SHAPES = [  # name, B, Hq, Hkv, S (keys), D, causal, dtype[, queries: the last ones, after a cached prefix]
    ("B16 H16 S2K D64 fp16", 16, 16, 16, 2048, 64, False, torch.float16),
    ("B16 H16 S2K D64 fp16 causal", 16, 16, 16, 2048, 64, True, torch.float16),
    ("B1 32/8 S8K D128 bf16 causal", 1, 32, 8, 8192, 128, True, torch.bfloat16),
    ("B1 32/8 S32K D128 bf16 causal", 1, 32, 8, 32768, 128, True, torch.bfloat16),
    ("B4 32/8 S4K D128 bf16 causal", 4, 32, 8, 4096, 128, True, torch.bfloat16),
    ("B1 32/8 S64K D128 bf16 causal", 1, 32, 8, 65536, 128, True, torch.bfloat16),
    ("B1 32/8 S128K D128 bf16 causal", 1, 32, 8, 131072, 128, True, torch.bfloat16),
    ("B1 32/8 chunk 4K after 28K D128 bf16", 1, 32, 8, 32768, 128, True, torch.bfloat16, 4096),
]
PAGE_SIZES = (128, 64, 16)


def paged_copy(k, v, page_size, generator):
    """Dense k, v [B, S, Hkv, D] -> (k_cache, v_cache [num_pages, page_size, Hkv, D], PageLayout) with pages in a
    random physical order."""
    B, S, hkv, D = k.shape
    pages_per_seq = S // page_size
    num_pages = B * pages_per_seq
    cols = torch.randperm(num_pages, generator=generator).to(torch.int32).cuda()
    k_cache = torch.empty(num_pages, page_size, hkv, D, dtype=k.dtype, device="cuda")
    v_cache = torch.empty_like(k_cache)
    k_cache[cols.long()] = k.reshape(num_pages, page_size, hkv, D)
    v_cache[cols.long()] = v.reshape(num_pages, page_size, hkv, D)
    row_offsets = (torch.arange(B + 1, dtype=torch.int32) * pages_per_seq).cuda()
    counts = torch.full((num_pages,), page_size, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, fc.PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))


def bench_shape(name, B, Hq, Hkv, S, D, causal, dtype, q_len=None, *, flex, rep_ms, refs=True, rounds=1):
    """One shape: S keys per sequence and its last q_len (default S) positions as queries; causal is bottom-right
    aligned (a chunked prefill's queries see the whole cached prefix). Every implementation is timed once per round,
    the order reversed from one round to the next (the board's power limit makes the clock depend on what ran
    before); each column is the median over the rounds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    Sq = S if q_len is None else q_len
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(dtype).cuda()
    k = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).cuda()
    v = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).cuda()
    visible_pairs = Sq * (S - Sq) + Sq * (Sq + 1) / 2 if causal else Sq * S  # per (sequence, head)
    flops = 4 * B * Hq * D * (S * S / 2 if causal and Sq == S else visible_pairs)
    row = dict(shape=name, B=B, Hq=Hq, Hkv=Hkv, S=S, D=D, causal=causal, dtype=str(dtype).replace("torch.", ""))
    timers = {}  # column -> the call to time

    # dense contiguous references
    qd = q.transpose(1, 2).contiguous()
    kd, vd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    ke, ve = (kd, vd) if Hq == Hkv else (kd.repeat_interleave(Hq // Hkv, 1), vd.repeat_interleave(Hq // Hkv, 1))
    sdpa_out = None
    backends = (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)) if refs else ()
    lower_right = causal_lower_right(Sq, S) if Sq != S else None  # the chunked row's bottom-right causal mask
    for label, backend in backends:
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                if lower_right is None:
                    return F.scaled_dot_product_attention(qd, ke, ve, is_causal=causal)
                return F.scaled_dot_product_attention(qd, ke, ve, attn_mask=lower_right)
        try:
            out = sdpa()
        except Exception as err:  # a backend missing on this machine is reported, not fatal
            row[label + "_err"] = repr(err)[:120]
            continue
        if label == "sdpa_flash":
            sdpa_out = out.transpose(1, 2).reshape(B * Sq, Hq, D)
        timers[label + "_TF"] = sdpa
    if flex is not None and S > 32768:
        row["flex_err"] = "not run above 32K keys (building the causal block mask takes too long)"
    elif flex is not None and Sq != S:
        row["flex_err"] = "not run for chunked prefill"
    elif flex is not None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask

            mask = (create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cuda")
                    if causal else None)
            fn = lambda: flex(qd, kd, vd, block_mask=mask, enable_gqa=Hq != Hkv)  # noqa: E731
            fn()
            timers["flex_TF"] = fn
        except Exception as err:
            row["flex_err"] = repr(err)[:160]

    q_packed = q.reshape(B * Sq, Hq, D)
    q_indptr = (torch.arange(B + 1, dtype=torch.int32) * Sq).cuda()
    for page_size in PAGE_SIZES:
        k_cache, v_cache, layout = paged_copy(k, v, page_size, gen)

        def planned_run(k_cache=k_cache, v_cache=v_cache, layout=layout, page_size=page_size):
            # the plan picks the kernel (FLASHCORE_PREFILL_KERNEL is read when planning)
            plan = fc.plan_attention(layout, q_indptr, num_q_heads=Hq, num_kv_heads=k_cache.shape[2], head_dim=D,
                                     page_size=page_size, dtype=q.dtype, total_q=B * Sq, causal=causal)
            return lambda: plan.run(q_packed, k_cache, v_cache, layout, q_indptr)

        fn = planned_run()
        out = fn()
        if sdpa_out is not None:
            row[f"ps{page_size}_maxdiff_vs_flash"] = (out.float() - sdpa_out.float()).abs().max().item()
        timers[f"flashcore_ps{page_size}_TF"] = fn
        if page_size == 128:
            previous = os.environ.get("FLASHCORE_PREFILL_KERNEL")
            os.environ["FLASHCORE_PREFILL_KERNEL"] = "mma"
            try:
                timers["flashcore_mma_ps128_TF"] = planned_run()
            finally:
                if previous is None:
                    del os.environ["FLASHCORE_PREFILL_KERNEL"]
                else:
                    os.environ["FLASHCORE_PREFILL_KERNEL"] = previous
        del out
    del sdpa_out

    samples = {column: [] for column in timers}
    for round_index in range(rounds):
        order = list(timers) if round_index % 2 == 0 else list(reversed(timers))
        for column in order:
            samples[column].append(flops / median_ms(timers[column], rep_ms=rep_ms) / 1e9)
    for column, tflops in samples.items():
        row[column] = statistics.median(tflops)
    for page_size in PAGE_SIZES:
        for ref in ("sdpa_flash", "sdpa_cudnn", "flex"):
            if ref + "_TF" in row:
                ratio = row[f"flashcore_ps{page_size}_TF"] / row[ref + "_TF"]
                row[f"ps{page_size}_vs_{ref.replace('sdpa_', '')}"] = ratio
    row["ps16_vs_ps128"] = row["flashcore_ps16_TF"] / row["flashcore_ps128_TF"]
    del timers, samples
    torch.cuda.empty_cache()
    return row


SOFTCAP_SHAPES = ["B1 32/8 S8K D128 bf16 causal", "B16 H16 S2K D64 fp16 causal"]
SOFTCAP = 30.0


def softcap_cost(rep_ms):
    """flashcore alone, in one run: plain, softcap, sinks and both on SOFTCAP_SHAPES (page size 128), with the default
    kernel and with FLASHCORE_PREFILL_KERNEL=mma; TFLOP/s and the time ratio to plain."""
    rows = []
    for shape in SHAPES:
        name, B, Hq, Hkv, S, D, causal, dtype = shape[:8]
        if name not in SOFTCAP_SHAPES:
            continue
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(B * S, Hq, D, generator=gen).to(dtype).cuda()
        k = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).cuda()
        v = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).cuda()
        sinks = torch.randn(Hq, generator=gen).cuda()
        k_cache, v_cache, layout = paged_copy(k, v, 128, gen)
        q_indptr = (torch.arange(B + 1, dtype=torch.int32) * S).cuda()
        flops = 4 * B * Hq * S * S * D * (0.5 if causal else 1.0)
        previous = os.environ.get("FLASHCORE_PREFILL_KERNEL")
        try:
            for kernel in ("default", "mma"):
                if kernel == "mma":
                    os.environ["FLASHCORE_PREFILL_KERNEL"] = "mma"
                row = dict(shape=name, kernel=kernel)
                for variant, softcap, sink in (("plain", None, None), ("softcap", SOFTCAP, None),
                                               ("sinks", None, sinks), ("softcap_sinks", SOFTCAP, sinks)):
                    plan = fc.plan_attention(layout, q_indptr, num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2],
                                             head_dim=q.shape[2], page_size=128, dtype=q.dtype, total_q=q.shape[0],
                                             causal=causal, softcap=softcap)
                    fn = lambda: plan.run(q, k_cache, v_cache, layout, q_indptr, sinks=sink)  # noqa: E731
                    fn()
                    ms = median_ms(fn, rep_ms=rep_ms)
                    row[f"{variant}_ms"] = ms
                    row[f"{variant}_TF"] = flops / ms / 1e9
                for variant in ("softcap", "sinks", "softcap_sinks"):
                    row[f"{variant}_vs_plain"] = row[f"{variant}_ms"] / row["plain_ms"]
                rows.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        finally:
            if previous is None:
                os.environ.pop("FLASHCORE_PREFILL_KERNEL", None)
            else:
                os.environ["FLASHCORE_PREFILL_KERNEL"] = previous
        del q, k, v, k_cache, v_cache
        torch.cuda.empty_cache()
    csv_path = write_csv(rows, "bench_prefill_softcap.csv")
    print(f"\n{device_name()}; softcap {SOFTCAP}; CSV: {csv_path}")
    print_table(rows, ["shape", "kernel", "plain_TF", "softcap_TF", "sinks_TF", "softcap_sinks_TF", "softcap_vs_plain",
                       "sinks_vs_plain", "softcap_sinks_vs_plain"])


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    series = [f"flashcore_ps{ps}_TF" for ps in PAGE_SIZES] + ["sdpa_flash_TF", "sdpa_cudnn_TF", "flex_TF"]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(series)
    for i, key in enumerate(series):
        ax.bar([x + i * width for x in range(len(rows))], [r.get(key, 0.0) for r in rows], width,
               label=key.replace("_TF", ""))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], [r["shape"] for r in rows], rotation=15,
                  fontsize=8)
    ax.set_ylabel("TFLOP/s (causal counts half)")
    ax.set_title(f"prefill attention forward, {device_name()}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing, no FlexAttention")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--only", default="", help="run only the shapes whose name contains this text")
    parser.add_argument("--no-refs", action="store_true", help="time flashcore only (no SDPA, no FlexAttention)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every implementation this many times per shape, alternating the order; medians")
    parser.add_argument("--softcap", action="store_true",
                        help=f"only the cost of softcap {SOFTCAP} and sinks on {SOFTCAP_SHAPES} (flashcore alone)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.softcap:
        softcap_cost(rep_ms=50 if args.quick else 200)
        return
    flex = None
    if not (args.quick or args.no_flex or args.no_refs):
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
        except Exception:
            traceback.print_exc()
    rows = []
    for shape in SHAPES:
        if args.only not in shape[0]:
            continue
        row = bench_shape(*shape, flex=flex, rep_ms=50 if args.quick else 200, refs=not args.no_refs,
                          rounds=args.rounds)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
    csv_path = write_csv(rows, "bench_prefill.csv")
    plot(rows, output_dir() / "bench_prefill.png")
    print(f"\n{device_name()}; CSV: {csv_path}")
    print_table(rows, ["shape", "flashcore_ps128_TF", "flashcore_ps64_TF", "flashcore_ps16_TF",
                       "flashcore_mma_ps128_TF", "sdpa_flash_TF", "sdpa_cudnn_TF", "flex_TF", "ps128_vs_cudnn",
                       "ps64_vs_cudnn", "ps16_vs_ps128", "ps128_vs_flex"])


if __name__ == "__main__":
    main()
