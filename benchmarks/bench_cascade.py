"""Cascade decode attention vs plain paged decode: N sequences sharing a P-token prefix, one query each.

Shape: Hq 32 / Hkv 8, head dim 128, bf16, page size 64, pages scattered by a permutation; every sequence has the
shared prefix's pages, then 1-64 tokens of its own (different lengths). One attention call per layer, as the HF
integration runs it, each a CUDA graph replay timed by triton's do_bench (median, L2 flushed before every run; a
replay includes the graph launch, a few µs that a layer inside a decode step's graph does not pay).
Columns: `plain` reads every row's pages (the split-KV decode kernel); `groups16` is the cascade in groups of 16
rows on the decode kernel (what the cache ran before key splits); `cascade` is what PagedKVCache plans now
(step_plan.shared_prefixes / prefix_splits / cascade_layouts: one group, its prefix in `splits` key splits through the
prefill kernel, merged with each row's own pages by lse; ops.cascade_attention). `--sweep` adds a column per forced
split count. `err` is max |cascade - plain| (both bf16).
Writes cascade.csv under $OUT (or ./benchmark_results) and prints a table last.

    python benchmarks/bench_cascade.py [--rows 32 64 128 256] [--prefix 2048 8192 32768] [--sweep 1 2 4 8 16]
    python benchmarks/bench_cascade.py --rows 128 --prefix 2048 --kernels   # the cascade replay's kernels too
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, graph_of, kernels_of, median_ms, print_table, write_csv  # noqa: E402

import flashcore_hf as fc  # noqa: E402
from flashcore_hf.cache.step_plan import (FULL, PREFIX, SUFFIX, QueryRuns, build_layouts,  # noqa: E402
                                          cascade_layouts, prefix_splits, shared_prefixes)

HQ, HKV, D, PAGE = 32, 8, 128, 64
DTYPE = torch.bfloat16


def make_batch(rows: int, prefix: int, gen: torch.Generator):
    """Pools, page tables and key counts of `rows` sequences sharing `prefix` keys (whole pages), each with 1-64 keys
    of its own after them; q [rows, HQ, D]."""
    shared_pages = prefix // PAGE
    own = [1 + (r * 37) % PAGE for r in range(rows)]            # 1-64 keys of its own: one page each
    num_pages = shared_pages + rows
    perm = torch.randperm(num_pages, generator=gen).tolist()
    tables = [perm[:shared_pages] + [perm[shared_pages + r]] for r in range(rows)]
    keys = [shared_pages * PAGE + n for n in own]
    k_pool = torch.randn(num_pages, PAGE, HKV, D, device="cuda", dtype=DTYPE)
    v_pool = torch.randn(num_pages, PAGE, HKV, D, device="cuda", dtype=DTYPE)
    q = torch.randn(rows, HQ, D, device="cuda", dtype=DTYPE)
    return k_pool, v_pool, tables, keys, q


def plan(layout: fc.PageLayout, q_indptr: torch.Tensor, causal: bool = True) -> fc.AttentionPlan:
    """plan_attention once from host copies (exact bounds), as the cache plans a step."""
    return fc.plan_attention(layout.to("cuda"), q_indptr.cuda(), num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                             page_size=PAGE, dtype=DTYPE, causal=causal,
                             host_metadata=(layout.row_offsets, q_indptr))


def plain_call(k_pool, v_pool, tables, keys, q):
    """Attention over every row's pages, as a step without sharing runs it (step_plan.build_layouts' "full")."""
    rows = len(tables)
    runs = QueryRuns(list(range(rows + 1)), list(range(rows)), keys)
    layout = build_layouts(runs, tables, PAGE, None)[0][FULL]
    q_indptr = torch.arange(rows + 1, dtype=torch.int32)
    attention_plan, device_layout, device_indptr = plan(layout, q_indptr), layout.to("cuda"), q_indptr.cuda()
    return lambda: attention_plan.run(q, k_pool, v_pool, device_layout, device_indptr)


def cascade_call(k_pool, v_pool, tables, keys, q, *, max_group=None, splits=None):
    """The cascade as the cache plans it (splits None: prefix_splits' choice); returns (fn, splits)."""
    rows = len(tables)
    shared = shared_prefixes(tables, keys, PAGE, max_group=max_group)
    if splits is None:
        splits = prefix_splits(shared, PAGE, HQ, torch.cuda.get_device_properties(0).multi_processor_count)
    runs = QueryRuns(list(range(rows + 1)), list(range(rows)), keys)
    layouts, _, parts = cascade_layouts(shared, runs, tables, PAGE, splits)
    order, inverse, group_indptr = (t.cuda() for t in parts)
    q_indptr = torch.arange(rows + 1, dtype=torch.int32)
    prefix_plan, suffix_plan = plan(layouts[PREFIX], parts[2], causal=False), plan(layouts[SUFFIX], q_indptr)
    prefix_layout, suffix_layout = layouts[PREFIX].to("cuda"), layouts[SUFFIX].to("cuda")
    device_indptr = q_indptr.cuda()
    return (lambda: fc.ops.cascade_attention(q, k_pool, v_pool, prefix_plan, prefix_layout, suffix_plan, suffix_layout,
                                             order, inverse, group_indptr, device_indptr)), splits


def graph_us(fn) -> float:
    replay, why = graph_of(fn)
    if replay is None:
        raise RuntimeError(f"capture failed: {why}")
    return median_ms(replay) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--prefix", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--sweep", type=int, nargs="*", default=[], help="forced prefix split counts to time too")
    parser.add_argument("--kernels", action="store_true", help="print the kernels of each cascade replay")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    results = []
    for prefix in args.prefix:
        for rows in args.rows:
            torch.manual_seed(rows + prefix)
            k_pool, v_pool, tables, keys, q = make_batch(rows, prefix, gen)
            plain = plain_call(k_pool, v_pool, tables, keys, q)
            groups16, _ = cascade_call(k_pool, v_pool, tables, keys, q, max_group=16, splits=1)
            cascade, splits = cascade_call(k_pool, v_pool, tables, keys, q)
            row = {"rows": rows, "prefix": prefix, "splits": splits, "plain_us": graph_us(plain),
                   "groups16_us": graph_us(groups16), "cascade_us": graph_us(cascade)}
            row["plain/cascade"] = row["plain_us"] / row["cascade_us"]
            row["groups16/cascade"] = row["groups16_us"] / row["cascade_us"]
            row["err"] = (cascade().float() - plain().float()).abs().max().item()
            for forced in args.sweep:
                row[f"s{forced}_us"] = graph_us(cascade_call(k_pool, v_pool, tables, keys, q, splits=forced)[0])
            results.append(row)
            print(row, flush=True)
            if args.kernels:
                for name, launches, us in kernels_of(graph_of(cascade)[0]):
                    print(f"    {us:7.1f} us  x{launches:g}  {name[:110]}")
            del k_pool, v_pool
    write_csv(results, "cascade.csv")
    print(f"\n{device_name()}, Hq {HQ} / Hkv {HKV}, D {D}, bf16, page {PAGE}; one layer's attention per graph "
          "replay, µs")
    print_table(results, ["rows", "prefix", "plain_us", "groups16_us", "cascade_us", "splits", "plain/cascade",
                          "groups16/cascade", "err"] + [f"s{s}_us" for s in args.sweep])


if __name__ == "__main__":
    main()
