"""Every strategy through the real run, side by side: accuracy, forgetting, cost.

    python -m bench.strategies                      # all six on the embedded default
    python -m bench.strategies --strategies lora,full -- --steps 100 train.lr=0.01

Each strategy runs `engine.run` in its own process (a fresh DeepSpeed and a clean peak-memory
reading), with the same seed and options; the table and `bench/results/strategies-<device>.{csv,json}`
hold one row per strategy (the run's results.json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from adapters import STRATEGIES

from .device import device_name
from .report import add_output_options, format_table, parse_args, save_or_skip

TABLE_COLUMNS = ("strategy", "trainable_params", "target_top1", "source_knn_before", "source_knn_after",
                 "forgetting", "mean", "train_img_per_s", "infer_img_per_s", "peak_mem_mb",
                 "train_gflops_per_img", "infer_gflops_per_img", "wall_s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.strategies", description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list (default: every registered strategy)")
    p.add_argument("--runs", default="runs/bench-strategies", help="folder for the runs")
    add_output_options(p)
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: options passed to engine.run")
    args = parse_args(p, argv)
    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    extra = [a for a in args.run_args if a != "--"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for strategy in strategies:
        name = f"{strategy}-{stamp}"
        cmd = [sys.executable, "-m", "engine.run", "--strategy", strategy, "--out", args.runs, "--name", name, *extra]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"{strategy}: run failed", file=sys.stderr)
            continue
        rows.append({"device": device_name(), **json.loads((Path(args.runs) / name / "results.json").read_text())})
    if not rows:
        return 1
    print()
    print(format_table(rows, TABLE_COLUMNS, formats={c: ".2f" for c in TABLE_COLUMNS[2:]}, markdown=args.markdown))
    save_or_skip(args, "strategies", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
