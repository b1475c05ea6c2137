"""bench.report: one table format, CSV + JSON side by side, and when a run may write at all."""
import argparse
import csv
import json

import pytest

from bench import report
from bench.device import device_name


def _args(argv, quick_option=True):
    parser = argparse.ArgumentParser(prog="python -m bench.x")
    if quick_option:
        parser.add_argument("--quick", action="store_true")
    report.add_output_options(parser, quick=quick_option)
    return report.parse_args(parser, argv)


ROWS = [{"name": "a", "count": 12345, "ms": 1.23456, "frac": 0.0123},
        {"name": "bb", "count": 7, "ms": 250.0, "frac": None}]


def test_text_table_is_right_aligned_with_labels_and_formats():
    text = report.format_table(ROWS, ["name", "count", "ms", "frac"], labels={"ms": "time ms"},
                               formats={"frac": ".1%"})
    assert text.splitlines() == ["name   count  time ms  frac",
                                 "   a  12,345    1.235  1.2%",
                                 "  bb       7      250      "]


def test_markdown_table():
    text = report.format_table(ROWS, ["name", "count"], markdown=True)
    assert text.splitlines() == ["| name | count |", "| ---: | ---: |", "| a | 12,345 |", "| bb | 7 |"]


@pytest.mark.parametrize("argv, written", [
    (["--quick"], False),
    (["--quick", "--save"], True),
    ([], True),
])
def test_quick_run_writes_only_with_save(results_dir, argv, written, capsys):
    paths = report.save_or_skip(_args(argv), "thing", ROWS)
    stem = results_dir / f"thing-{device_name()}"
    assert [p.name for p in paths] == ([stem.name + ".csv", stem.name + ".json"] if written else [])
    assert results_dir.exists() == written
    if not written:
        assert "results not written" in capsys.readouterr().out


def test_out_path_is_used_even_for_quick_and_suffix_dropped(results_dir, tmp_path):
    paths = report.save_or_skip(_args(["--quick", "--out", str(tmp_path / "mine.csv")]), "thing", ROWS)
    assert paths == [tmp_path / "mine.csv", tmp_path / "mine.json"]
    assert not results_dir.exists()


def test_bench_without_quick_option_always_writes(results_dir):
    assert report.save_or_skip(_args([], quick_option=False), "thing", ROWS)


def test_csv_and_json_hold_the_same_rows_and_the_command(tmp_path):
    args = _args(["--out", str(tmp_path / "r")])
    csv_path, json_path = report.save_or_skip(args, "thing", ROWS, columns=["name", "count", "frac"], tag="-x")
    with open(csv_path) as f:
        assert list(csv.DictReader(f)) == [{"name": "a", "count": "12345", "frac": "0.0123"},
                                           {"name": "bb", "count": "7", "frac": ""}]
    doc = json.loads(json_path.read_text())
    assert doc["rows"] == [{"name": "a", "count": 12345, "frac": 0.0123}, {"name": "bb", "count": 7, "frac": None}]
    assert doc["meta"]["command"] == f"python -m bench.x --out {tmp_path / 'r'}"
    assert doc["meta"]["device"] == device_name()


def test_a_failed_write_leaves_the_old_pair(tmp_path):
    stem = tmp_path / "r"
    report.write_results(stem, ROWS)
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    circular = {}
    circular["itself"] = circular
    with pytest.raises(ValueError, match="Circular"):
        report.write_results(stem, ROWS[:1], meta=circular)  # the CSV could be written, the JSON cannot
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before  # and no temp files left
