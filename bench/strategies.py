"""Every strategy through the real run, side by side: accuracy, forgetting, cost.

    python -m bench.strategies                      # all six on the embedded default
    python -m bench.strategies --strategies lora,full -- --steps 100 train.lr=0.01

Each strategy runs `engine.run` in its own process (a fresh DeepSpeed and a clean peak-memory
reading), with the same seed and options; the table and `bench/results/strategies-<device>.csv`
hold one row per strategy (the run's results.json).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from adapters import STRATEGIES

from .device import device_name

ALL = tuple(STRATEGIES)
COLUMNS = ("strategy", "trainable_params", "target_top1", "source_knn_before", "source_knn_after",
           "forgetting", "mean", "train_img_per_s", "infer_img_per_s", "peak_mem_mb",
           "train_gflops_per_img", "infer_gflops_per_img", "wall_s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.strategies", description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default=",".join(ALL), help="comma list (default: every registered strategy)")
    p.add_argument("--out", default="runs/bench-strategies", help="folder for the runs")
    p.add_argument("--results", default="bench/results", help="folder for the CSV")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: options passed to engine.run")
    args = p.parse_args(argv)
    extra = [a for a in args.run_args if a != "--"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for strategy in args.strategies.split(","):
        name = f"{strategy}-{stamp}"
        cmd = [sys.executable, "-m", "engine.run", "--strategy", strategy, "--out", args.out, "--name", name, *extra]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"{strategy}: run failed", file=sys.stderr)
            continue
        rows.append(json.loads((Path(args.out) / name / "results.json").read_text()))
    if not rows:
        return 1
    device = device_name()
    path = Path(args.results) / f"strategies-{device}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", *keys])
        writer.writeheader()
        for row in rows:
            writer.writerow({"device": device, **row})
    print(format_rows(rows))
    print(f"\nwritten: {path}")
    return 0


def _cell(v) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.2f}" if isinstance(v, float) else str(v)


def format_rows(rows: list[dict], columns=COLUMNS, cell=_cell) -> str:
    """A right-aligned text table of `rows` under `columns`, each value through `cell`."""
    table = [tuple(columns)] + [tuple(cell(r.get(c, "")) for c in columns) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)


if __name__ == "__main__":
    sys.exit(main())
