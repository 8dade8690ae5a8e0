"""Sparse page selection benchmark: long-context decode with topk / streaming pages vs dense flashcore decode.

1. Attention per layer, B=1 x 128K context, Hq 32 / Hkv 8, D 128, bf16, page size 64, budget 4096 tokens (64 pages):
   dense flashcore decode vs topk (the select_pages kernels: Quest scores + radix top-k, then paged_attention over
   per-kv-head page lists), topk_rerank (topk with rerank=4: the exact scores of 4 x budget candidates' keys pick
   the budget), topk_signs (pages scored by their keys' sign bits) and streaming, with the parts
   (selection, attention, the summary update of the written page, the once-per-step page table) and the whole of
   it (as PagedKVCache runs a topk layer: the append beside the selection, `topk_layer`); graph_us: replays of a CUDA graph holding one call (no host launch overhead, as inside a graph-captured
   decode step; the graph launch's own fixed cost is included). Two more clocks:
   `gpu_us` is triton's do_bench median (device time, L2 flushed), `wall_us` back-to-back calls on the host clock
   (includes Python and launch overhead, what an eager decode step pays). SDPA cuDNN on a contiguous copy of the
   same K/V is the reference.
   A graph of one layer pays the graph launch and do_bench's L2 flush (a 256 MB memset whose dirty lines the
   first kernels write back) once per layer; inside a decode step neither recurs per layer. So the whole per-layer
   chain is also timed as a decode step runs it (--stacked-layers N, default 16): one CUDA graph of N layers, each
   with its own K/V pools and page summaries (cold in L2, as after another layer's weights), sharing the step's page
   table and plans; rows "... per layer in an N-layer graph" report the replay time / N.
2. End to end: a Llama-3-8B-shaped model with random bf16 weights (32 layers, hidden 4096, 32/8 heads, D128, vocab
   128256), generate() on one 128K-token prompt through the cache generate() builds (set_default_cache_options(
   page_size=64, sparse=...)): dense and topk with flashcore's CUDA-graph decode (--policies dense,topk,streaming
   adds streaming, --eager-too every policy without graphs: one more 128K prefill each). Prefill seconds and decode tokens/s (median step time
   from a stopping criterion that timestamps every step after a device sync, which generate() does each step
   anyway); speedups compare runs with the same decode mode (graphs or eager).

Writes sparse_layer.csv, sparse_e2e.csv and sparse.png under $OUT (or ./benchmark_results); prints the tables last.

    python benchmarks/bench_sparse.py [--context 131072] [--budget 4096] [--new-tokens 48] [--skip-e2e] [--eager-too]
    python benchmarks/bench_sparse.py --skip-e2e --kernels   # + the kernels of each per-layer graph replay
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepEvents, device_name, graph_of, kernels_of, median_ms, output_dir, print_table, write_csv  # noqa: E402

import flashcore_hf as fc  # noqa: E402
from flashcore_hf.cache import page_count_bucket  # noqa: E402
from flashcore_hf.cache.handles import LayerWrite  # noqa: E402
from flashcore_hf.sparse import PageKeySummaries, StepSelection, refresh_slots  # noqa: E402

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16


def wall_us(fn, iters: int = 200) -> float:
    """Host-clock microseconds per call of back-to-back calls (launch and Python overhead included)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def decode_plan(q_indptr, page_size: int, rows: int, pages: int, nnz: int):
    """The plan of a B=1 decode step (one query, Hq / Hkv / D / dtype of this benchmark) over a layout of `rows` rows,
    at most `pages` pages per row and `nnz` page entries: made once per step, run by every layer and graph replay."""
    shape = fc.PageLayout(*(torch.empty(n, dtype=torch.int32, device="cuda") for n in (rows + 1, nnz, nnz, nnz)))
    return fc.plan_attention(shape, q_indptr, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=page_size,
                             dtype=DTYPE, total_q=1, max_q_len=1, max_pages_per_seq=pages, exact=True)


def layer_benchmark(context: int, budget: int, page_size: int, kernels: bool = False) -> list[dict]:
    """Rows of the per-layer table; kernels: also print the kernels of every graph-captured row (one replay)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_pages = context // page_size
    k_pool = torch.randn(num_pages + 8, page_size, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    v_pool = torch.randn(num_pages + 8, page_size, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    cols = torch.randperm(num_pages + 8, device="cuda", generator=gen)[:num_pages].to(torch.int32)
    counts = torch.full_like(cols, page_size)
    layout = fc.PageLayout(torch.tensor([0, num_pages], device="cuda", dtype=torch.int32), cols, counts,
                           torch.full_like(cols, -1))
    q = torch.randn(1, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    q_indptr = torch.tensor([0, 1], device="cuda", dtype=torch.int32)
    max_pages = page_count_bucket(num_pages)
    summaries_of = {"bounds": PageKeySummaries(), "signs": PageKeySummaries(keep_signs=True)}   # by scoring
    all_slots = refresh_slots(cols, counts, page_size)
    refresh_ms = {scoring: median_ms(lambda s=s: s.refresh(k_pool, *all_slots)) for scoring, s in summaries_of.items()}
    # A decode step writes the last slot of the last page: its key widens that page's bounds (the append and the
    # bounds are one kernel: PageKeySummaries.append_decode).
    last_slot = cols[-1:] * page_size + page_size - 1
    k_new, v_new = (torch.randn(1, HKV, D, device="cuda", dtype=DTYPE, generator=gen) for _ in range(2))

    dense_plan = decode_plan(q_indptr, page_size, 1, max_pages, layout.cols.numel())

    def dense():
        return dense_plan.run(q, k_pool, v_pool, layout, q_indptr)

    rows = []

    def add(name, fn, graph=True, note=""):
        """Time fn; speedup_vs_dense compares CUDA-graph times when both were captured, else do_bench times."""
        row = dict(what=name, gpu_us=1e3 * median_ms(fn), wall_us=wall_us(fn), note=note)
        if graph:
            replay, why = graph_of(fn)
            row["graph_us"] = 1e3 * median_ms(replay) if replay else None
            if kernels and replay:
                print(f"kernels of one replay of '{name}' (launches, GPU µs, name):")
                for kernel, count, us in kernels_of(replay):
                    print(f"  {count:4.0f} {us:8.2f}  {kernel[:140]}")
            if why:
                row["note"] = "; ".join(filter(None, [note, f"graph capture failed: {why}"]))
        rows.append(row)
        return row

    def speedup(row):
        both = row.get("graph_us") and base.get("graph_us")
        row["speedup_vs_dense"] = base["graph_us"] / row["graph_us"] if both else base["gpu_us"] / row["gpu_us"]

    base = add("dense flashcore decode", dense)
    speedup(base)
    k_dense = k_pool[cols.long()].reshape(1, context, HKV, D).transpose(1, 2).contiguous()
    v_dense = v_pool[cols.long()].reshape(1, context, HKV, D).transpose(1, 2).contiguous()
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        try:
            sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense, enable_gqa=True)  # noqa
            sdpa()
            rows.append(dict(what="SDPA cuDNN (dense, contiguous)", gpu_us=1e3 * median_ms(sdpa), wall_us=wall_us(sdpa),
                             note="reference"))
        except RuntimeError as err:
            rows.append(dict(what="SDPA cuDNN (dense, contiguous)", note=f"failed: {str(err)[:80]}"))
    del k_dense, v_dense

    for policy in ("topk", "topk_rerank", "topk_signs", "streaming"):
        config = sparse_config(policy, budget)
        summaries = summaries_of[config.scoring]
        step_plan = lambda: StepSelection(config, layout, max_pages, 1, page_size)  # noqa: E731
        step = step_plan()
        k = step.max_pages_per_row
        if policy != "topk_rerank":
            add(f"{policy}: page table (once per step, all layers)", step_plan, graph=False)
        if policy.startswith("topk"):
            add(f"{policy}: selection (per layer)", lambda: step.layout_for(q, summaries, k_pool))
            chosen = step.layout_for(q, summaries, k_pool)
        else:
            chosen = step.layout_for(q, None)
        sparse_plan = decode_plan(q_indptr, page_size, chosen.row_offsets.numel() - 1, k, chosen.cols.numel())
        attend = lambda: sparse_plan.run(q, k_pool, v_pool, chosen, q_indptr)  # noqa: E731
        if policy != "topk_rerank":
            speedup(add(f"{policy}: attention on {k} selected pages", attend))
        if policy in ("topk", "topk_signs"):
            add(f"{policy}: append + summary update of the written page (per layer)",
                lambda: summaries.append_decode(k_pool, v_pool, k_new, v_new, last_slot))
        if policy.startswith("topk"):
            per_layer = functools.partial(topk_layer, step, summaries, sparse_plan, q, k_pool, v_pool, k_new, v_new,
                                          last_slot, q_indptr)
            speedup(add(f"{policy}: append + update + selection + attention (per layer)", per_layer,
                        note=f"the whole per-layer cost of a {policy} decode step"))
    for scoring, ms in refresh_ms.items():
        rows.append(dict(what=f"topk ({scoring}): summary refresh of the whole context (prefill, per layer)",
                         gpu_us=1e3 * ms, note=f"{num_pages} pages"))
    for row in rows:
        row.update(context=context, budget=budget, page_size=page_size)
    return rows


def topk_layer(step: StepSelection, summaries: PageKeySummaries, plan, q, k_pool, v_pool, k_new, v_new, slot,
               q_indptr) -> torch.Tensor:
    """One "topk" layer of a decode step as PagedKVCache runs it: the K/V append (+ summary fold) beside the page
    selection (LayerWrite), then attention on the selected pages."""
    write = LayerWrite(functools.partial(summaries.append_decode, k_pool, v_pool, k_new, v_new, slot))
    layout = write.run_beside(functools.partial(step.layout_for, q, summaries, k_pool), q.device)
    return plan.run(q, k_pool, v_pool, layout, q_indptr)


def stacked_layers_benchmark(context: int, budget: int, page_size: int, layers: int,
                             policies: list[str]) -> list[dict]:
    """Rows of the whole per-layer chain timed inside one CUDA graph of `layers` layers (see the module docstring):
    dense attention, and for each "topk" policy of `policies` (topk, topk_rerank, topk_signs) append + summary update
    + selection + attention; µs per layer."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    num_pages = context // page_size
    cols = torch.randperm(num_pages + 8, device="cuda", generator=gen)[:num_pages].to(torch.int32)
    counts = torch.full_like(cols, page_size)
    layout = fc.PageLayout(torch.tensor([0, num_pages], device="cuda", dtype=torch.int32), cols, counts,
                           torch.full_like(cols, -1))
    q_indptr = torch.tensor([0, 1], device="cuda", dtype=torch.int32)
    max_pages = page_count_bucket(num_pages)
    all_slots = refresh_slots(cols, counts, page_size)
    last_slot = cols[-1:] * page_size + page_size - 1
    pools, queries, new_kv = [], [], []
    for _ in range(layers):
        pools.append([torch.randn(num_pages + 8, page_size, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
                      for _ in range(2)])
        queries.append(torch.randn(1, HQ, D, device="cuda", dtype=DTYPE, generator=gen))
        new_kv.append([torch.randn(1, HKV, D, device="cuda", dtype=DTYPE, generator=gen) for _ in range(2)])

    dense_plan = decode_plan(q_indptr, page_size, 1, max_pages, num_pages)

    def dense_step():
        for (k_pool, v_pool), q in zip(pools, queries):
            dense_plan.run(q, k_pool, v_pool, layout, q_indptr)

    def time_per_layer(fn) -> float | None:
        replay, why = graph_of(fn)
        if replay is None:
            print(f"stacked graph capture failed: {why}", flush=True)
            return None
        return 1e3 * median_ms(replay) / layers

    rows = [dict(what=f"dense flashcore decode, per layer in a {layers}-layer graph", graph_us=time_per_layer(dense_step))]
    dense_us = rows[0]["graph_us"]
    rows[0]["speedup_vs_dense"] = 1.0 if dense_us else None
    for policy in (p for p in policies if sparse_config(p, budget).policy == "topk"):
        config = sparse_config(policy, budget)
        summaries = []
        for k_pool, _ in pools:
            layer_summaries = PageKeySummaries(keep_signs=config.scoring == "signs")
            layer_summaries.refresh(k_pool, *all_slots)
            summaries.append(layer_summaries)
        step = StepSelection(config, layout, max_pages, 1, page_size)
        k = step.max_pages_per_row
        sparse_plan = decode_plan(q_indptr, page_size, HKV, k, HKV * k)

        def sparse_step(step=step, sparse_plan=sparse_plan, summaries=summaries):
            for (k_pool, v_pool), q, (k_new, v_new), layer_summaries in zip(pools, queries, new_kv, summaries):
                topk_layer(step, layer_summaries, sparse_plan, q, k_pool, v_pool, k_new, v_new, last_slot, q_indptr)

        us = time_per_layer(sparse_step)
        rows.append(dict(what=f"{policy}: append + update + selection + attention, per layer in a {layers}-layer graph",
                         graph_us=us, speedup_vs_dense=dense_us / us if dense_us and us else None,
                         note="as inside a decode step's graph"))
        del summaries
    for row in rows:
        row.update(context=context, budget=budget, page_size=page_size, layers=layers)
    return rows


POLICY_OPTIONS = {"topk_rerank": dict(policy="topk", rerank=4), "topk_signs": dict(policy="topk", scoring="signs")}
"""Policy names beyond SparseConfig's own: "topk_rerank" (the bounds pick 4 x budget candidates, their keys' exact
scores the budget), "topk_signs" (pages scored by their keys' sign bits and the bounds)."""


def sparse_config(policy: str, budget: int) -> fc.SparseConfig:
    """The SparseConfig of a policy name: "dense", "streaming", "topk" or a POLICY_OPTIONS name."""
    return fc.SparseConfig(token_budget=budget, **POLICY_OPTIONS.get(policy, dict(policy=policy)))


class StepClock(StepEvents):
    """A generate() stopping criterion that only marks each step (common.StepEvents: no host sync)."""

    def __call__(self, input_ids, scores, **kwargs):
        self.mark()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def e2e_benchmark(context: int, budget: int, new_tokens: int, policies: list[str], eager_too: bool) -> list[dict]:
    """generate() through the default cache (what set_default_cache_options configures) for each policy, with
    flashcore's CUDA-graph decode, and with eager_too also every policy without graphs."""
    from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteriaList

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=max(131072, context + 256), rope_theta=500000.0,
                         tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.set_default_dtype(DTYPE)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("flashcore")
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, config.vocab_size, (1, context), device="cuda")

    def generate(prompt, new):
        clock = StepClock()
        torch.cuda.synchronize()
        clock.start()
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock]))
        times = clock.times()
        steps = [b - a for a, b in zip(times, times[1:])]
        return times[0], statistics.median(steps)

    cases = [(policy, graphs) for policy in policies for graphs in ((True, False) if eager_too else (True,))]
    rows = []
    for policy, graphs in cases:
        fc.set_default_cache_options(page_size=64, sparse=sparse_config(policy, budget))
        fc.set_cuda_graphs(graphs)
        generate(ids[:, :budget * 2], 8)                 # warm: a short prompt, already past the budget
        stats = fc.decode_graph_stats(model)
        replays = stats.replays if stats else 0
        prefill_s, step_s = generate(ids, new_tokens)
        stats = fc.decode_graph_stats(model)
        rows.append(dict(policy=policy, cuda_graphs=bool(stats and stats.replays > replays), context=context,
                         budget=budget if policy != "dense" else context, prefill_s=prefill_s,
                         ms_per_step=1e3 * step_s, decode_tok_s=1.0 / step_s))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    fc.set_cuda_graphs(True)
    fc.set_default_cache_options(sparse=fc.SparseConfig())
    for row in rows:
        same_mode = [r for r in rows if r["policy"] == "dense" and r["cuda_graphs"] == row["cuda_graphs"]]
        if same_mode:
            row["speedup_vs_dense_same_mode"] = row["decode_tok_s"] / same_mode[0]["decode_tok_s"]
    return rows


def plot(layer_rows, e2e_rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    shown = [r for r in layer_rows if r.get("graph_us") or r.get("gpu_us")]
    axes[0].barh([r["what"] for r in shown], [r.get("graph_us") or r["gpu_us"] for r in shown])
    axes[0].set_xlabel("µs per layer (CUDA graph where measured, else do_bench)")
    axes[0].invert_yaxis()
    axes[0].tick_params(axis="y", labelsize=7)
    if e2e_rows:
        axes[1].bar([f"{r['policy']}{' (graphs)' if r['cuda_graphs'] else ''}" for r in e2e_rows],
                    [r["decode_tok_s"] for r in e2e_rows])
        axes[1].set_ylabel("decode tokens/s (B=1)")
    axes[1].set_title(f"Llama-3-8B-shaped, {e2e_rows[0]['context'] if e2e_rows else ''} tokens")
    fig.suptitle(f"flashcore sparse decode on {device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--policies", default="dense,topk,topk_rerank",
                        help="comma-separated (dense, topk, topk_rerank, topk_signs, streaming)")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--eager-too", action="store_true", help="end to end also without CUDA-graph decode")
    parser.add_argument("--kernels", action="store_true", help="print the kernels of each per-layer graph replay")
    parser.add_argument("--stacked-layers", type=int, default=16,
                        help="layers in the graph of the stacked per-layer rows (0: skip them)")
    args = parser.parse_args()
    print(f"{device_name()}, torch {torch.__version__}", flush=True)

    layer_rows = layer_benchmark(args.context, args.budget, args.page_size, args.kernels)
    if args.stacked_layers > 0:
        torch.cuda.empty_cache()
        layer_rows += stacked_layers_benchmark(args.context, args.budget, args.page_size, args.stacked_layers,
                                               args.policies.split(","))
    write_csv(layer_rows, "sparse_layer.csv")
    torch.cuda.empty_cache()
    e2e_rows = [] if args.skip_e2e else e2e_benchmark(args.context, args.budget, args.new_tokens,
                                                      args.policies.split(","), args.eager_too)
    write_csv(e2e_rows, "sparse_e2e.csv")
    plot(layer_rows, e2e_rows, output_dir() / "sparse.png")

    print(f"\nattention per layer, B=1 x {args.context} tokens, budget {args.budget}, page size {args.page_size} "
          f"(µs; speedup from CUDA-graph times where captured)")
    print_table(layer_rows, ["what", "gpu_us", "wall_us", "graph_us", "speedup_vs_dense", "note"])
    if e2e_rows:
        print(f"\nend to end, Llama-3-8B-shaped random bf16, B=1 x {args.context}-token prompt, "
              f"{args.new_tokens} new tokens")
        print_table(e2e_rows, ["policy", "cuda_graphs", "budget", "prefill_s", "ms_per_step", "decode_tok_s",
                               "speedup_vs_dense_same_mode"])


if __name__ == "__main__":
    main()
