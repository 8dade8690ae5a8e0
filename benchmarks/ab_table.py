"""Medians of an A/B benchmark run: CSVs written by the same benchmark for two builds over several rounds, one table.

scripts/ab_compare.sh runs the benchmark alternately on a base and a changed tree, each round writing its CSV under
<results>/<build>_<round>/ (e.g. base_1/bench_prefill.csv, change_1/..., base_2/...). This prints, per row key, the
median of each numeric column over the rounds of each build and the change / base ratio of those medians.

    python benchmarks/ab_table.py RESULTS bench_prefill.csv [--key shape] [--columns flashcore_ps128_TF ...]
    python benchmarks/ab_table.py RESULTS bench_cpu.csv --key what path --columns prefill_s decode_tok_s
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

BUILDS = ("base", "change")


def read_rounds(results: Path, csv_name: str) -> dict[str, list[list[dict]]]:
    """{build: [rows of round 1, rows of round 2, ...]} from <results>/<build>_<round>/<csv_name>."""
    rounds: dict[str, list[list[dict]]] = {build: [] for build in BUILDS}
    for build in BUILDS:
        for path in sorted(results.glob(f"{build}_*/{csv_name}"), key=lambda p: p.parent.name):
            with open(path, newline="") as f:
                rounds[build].append(list(csv.DictReader(f)))
    return rounds


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def numeric_columns(rounds: dict[str, list[list[dict]]], key: list[str]) -> list[str]:
    """Columns (other than the key's) that hold a number in some row of some round, in first-seen order."""
    seen: dict[str, None] = {}
    for build_rounds in rounds.values():
        for rows in build_rounds:
            for row in rows:
                for column, value in row.items():
                    if column not in key and _number(value) is not None:
                        seen.setdefault(column)
    return list(seen)


def median_table(rounds: dict[str, list[list[dict]]], key: list[str], columns: list[str]) -> list[dict]:
    """One row per value of the key columns (in first-seen order): for each column, base and change medians over
    their rounds, and change / base. A build without a value for a cell leaves it empty."""
    key_name = " / ".join(key)
    keys: dict[str, None] = {}
    values: dict[tuple[str, str, str], list[float]] = {}
    for build, build_rounds in rounds.items():
        for rows in build_rounds:
            for row in rows:
                name = " / ".join(row.get(k, "") for k in key)
                keys.setdefault(name)
                for column in columns:
                    number = _number(row.get(column))
                    if number is not None:
                        values.setdefault((build, name, column), []).append(number)
    table = []
    for name in keys:
        out = {key_name: name}
        for column in columns:
            medians = {b: statistics.median(values[(b, name, column)]) for b in BUILDS if (b, name, column) in values}
            for build, median in medians.items():
                out[f"{build} {column}"] = median
            if len(medians) == 2 and medians["base"]:
                out[f"{column} change/base"] = medians["change"] / medians["base"]
        table.append(out)
    return table


def format_table(table: list[dict], rounds: dict[str, list[list[dict]]]) -> str:
    counts = ", ".join(f"{build} {len(r)} round(s)" for build, r in rounds.items())
    if not table:
        return f"no rows ({counts})"
    headers = list(dict.fromkeys(h for row in table for h in row))

    def cell(value) -> str:  # ratios and small values to 3 digits, larger ones whole
        if not isinstance(value, float):
            return str(value)
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"

    lines = [f"medians over rounds ({counts})", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(row.get(h, "")) for h in headers) + " |" for row in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("csv_name")
    parser.add_argument("--key", nargs="+", default=["shape"], help="the columns that name a row (default: shape)")
    parser.add_argument("--columns", nargs="*", help="numeric columns to show (default: all)")
    args = parser.parse_args(argv)
    rounds = read_rounds(args.results, args.csv_name)
    columns = args.columns or numeric_columns(rounds, args.key)
    print(format_table(median_table(rounds, args.key, columns), rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
