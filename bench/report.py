"""How every bench reports: one table format on screen and one way to write results.

Tables are right-aligned text, or Markdown (`--markdown`) to paste into bench/README.md. Results go
to `bench/results/<name>-<device>.csv` and `.json` side by side (the JSON adds how they were made:
the command, the device, the time, torch's version), each written atomically.

When results are written: on a full run, or when asked. A `--quick` run prints its tables and
writes nothing unless `--save` (the committed files) or `--out PATH` (files of your own) says so,
so a few-round figure never replaces a committed one by accident.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from engine.io import atomic_write_text

from .device import device_name

RESULTS_DIR = Path(__file__).parent / "results"


def add_output_options(parser: argparse.ArgumentParser, quick: bool = False) -> None:
    """--out and --markdown, the same on every bench; --save on those with a --quick."""
    if quick:
        parser.add_argument("--save", action="store_true",
                            help=f"write the results to {RESULTS_DIR.parent.name}/{RESULTS_DIR.name}/<name>-<device>"
                                 ".csv and .json even after --quick (a full run writes them anyway)")
    parser.add_argument("--out", type=Path, metavar="PATH",
                        help="write the results to PATH.csv and PATH.json instead (a .csv or .json suffix is dropped)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args(argv), with the command line kept as `args.command` for the results' meta."""
    args = parser.parse_args(argv)
    args.command = " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)])
    return args


def results_stem(args: argparse.Namespace, name: str, tag: str = "") -> Path | None:
    """Where this run's results go, without the suffix; None when they are only printed (--quick alone)."""
    if args.out is not None:
        return args.out.with_suffix("") if args.out.suffix in (".csv", ".json") else args.out
    if getattr(args, "quick", False) and not getattr(args, "save", False):
        return None
    return RESULTS_DIR / f"{name}-{device_name()}{tag}"


def format_cell(value) -> str:
    """Integers with thousands separators, floats to four significant digits (no exponent), None blank."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def format_table(rows: Iterable[Mapping], columns: Iterable[str], *, labels: Mapping[str, str] | None = None,
                 formats: Mapping[str, str | Callable] | None = None, markdown: bool = False) -> str:
    """`rows` under `columns`, right-aligned; `labels` renames headers, `formats` gives a column a
    format spec ('.2%') or a function; Markdown when asked."""
    columns, labels, formats = list(columns), labels or {}, formats or {}

    def cell(row, col):
        value, fmt = row.get(col), formats.get(col)
        if value is None or value == "" or fmt is None:
            return format_cell(value)
        return fmt(value) if callable(fmt) else format(value, fmt)

    table = [[labels.get(c, c) for c in columns]] + [[cell(r, c) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "|".join(" ---: " for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table[1:]])
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)


def write_results(stem: Path, rows: list[Mapping], columns: Iterable[str] | None = None,
                  meta: Mapping | None = None) -> list[Path]:
    """stem.csv (one line per row, under `columns`, default every key in order of appearance) and
    stem.json ({"meta": ..., "rows": [...]}), each atomically. Returns both paths."""
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({c: "" if row.get(c) is None else row.get(c) for c in columns} for row in rows)
    about = {"device": device_name(),
             "written": time.strftime("%Y-%m-%d %H:%M:%S %z"), "torch": torch.__version__, **(meta or {})}
    document = {"meta": about, "rows": [{c: row.get(c) for c in columns} for row in rows]}
    texts = {".csv": buffer.getvalue(), ".json": json.dumps(document, indent=2, default=str) + "\n"}
    # both texts exist before either file is replaced: a failure leaves the old pair, not a mixed one
    return [atomic_write_text(stem.with_name(stem.name + suffix), text) for suffix, text in texts.items()]

def save_or_skip(args: argparse.Namespace, name: str, rows: list[Mapping], columns: Iterable[str] | None = None,
                 tag: str = "", meta: Mapping | None = None) -> list[Path]:
    """Write the results where `results_stem` says, and say so; or say why nothing was written."""
    stem = results_stem(args, name, tag)
    if stem is None:
        print("\nresults not written (--quick: add --save to write them to bench/results, or --out PATH)")
        return []
    paths = write_results(stem, rows, columns, {"command": args.command, **(meta or {})})
    print("\nwrote " + " and ".join(str(p) for p in paths))
    return paths

