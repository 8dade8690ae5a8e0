"""benchmarks/ab_table.py: medians of an A/B benchmark run (scripts/ab_compare.sh) per build and row."""
import csv
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ab_table.py"
_spec = importlib.util.spec_from_file_location("ab_table", _PATH)
ab_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab_table)


def _write(results: Path, folder: str, rows: list[dict]) -> None:
    (results / folder).mkdir(parents=True)
    with open(results / folder / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_medians_per_build_and_ratio(tmp_path, capsys):
    _write(tmp_path, "base_1", [dict(shape="a", tf="100", note="x"), dict(shape="b", tf="50", note="")])
    _write(tmp_path, "base_2", [dict(shape="a", tf="110", note="x"), dict(shape="b", tf="70", note="")])
    _write(tmp_path, "base_3", [dict(shape="a", tf="90", note="x"), dict(shape="b", tf="60", note="")])
    _write(tmp_path, "change_1", [dict(shape="a", tf="120", note="y"), dict(shape="b", tf="", note="")])
    rounds = ab_table.read_rounds(tmp_path, "bench.csv")
    assert [len(rounds[b]) for b in ab_table.BUILDS] == [3, 1]
    assert ab_table.numeric_columns(rounds, ["shape"]) == ["tf"]
    table = ab_table.median_table(rounds, ["shape"], ["tf"])
    assert table[0] == {"shape": "a", "base tf": 100.0, "change tf": 120.0, "tf change/base": pytest.approx(1.2)}
    assert table[1] == {"shape": "b", "base tf": 60.0}          # the change has no value there: no ratio
    assert ab_table.main([str(tmp_path), "bench.csv"]) == 0
    printed = capsys.readouterr().out
    assert "base 3 round(s), change 1 round(s)" in printed and "| a | 100 | 120 | 1.2 |" in printed


def test_no_rounds(tmp_path, capsys):
    assert ab_table.main([str(tmp_path), "bench.csv"]) == 0
    assert "no rows" in capsys.readouterr().out


def test_key_of_several_columns(tmp_path):
    _write(tmp_path, "base_1", [dict(what="model", path="a", s="1"), dict(what="op", path="a", s="2")])
    _write(tmp_path, "change_1", [dict(what="model", path="a", s="3"), dict(what="op", path="a", s="4")])
    table = ab_table.median_table(ab_table.read_rounds(tmp_path, "bench.csv"), ["what", "path"], ["s"])
    assert [row["what / path"] for row in table] == ["model / a", "op / a"]
    assert [row["s change/base"] for row in table] == [3.0, 2.0]
