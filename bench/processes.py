"""Runs in processes of their own, stopped with real signals at a chosen step: what the durability
benchmark (`bench.kill_resume`) and the durability tests both need.

A run starts as `python -m engine.run` or, for several ranks, as torchrun of it, in a new session;
torchrun starts each worker in a session of its own too, so a signal meant for "the run" goes to
the whole process tree (`signal_tree`), as a node going down would. Every run gets a free port and
one intra-op thread (OMP_NUM_THREADS=1: the tiny embedded model gains nothing from more, and on a
busy machine OpenMP threads spin-waiting on each other cost far more).
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# results.json's timings (and how many processes wall_s sums, and its split by phase)
TIMING_KEYS = ("train_img_per_s", "infer_img_per_s", "peak_mem_mb", "wall_s", "processes", "time_s")
TIMING_COLUMNS = ("train_img_per_s", "elapsed_s")                                  # metrics.csv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(ranks: int, module: str = "engine.run") -> list[str]:
    """`python -m module`, or torchrun of it on `ranks` ranks."""
    if ranks == 1:
        return [sys.executable, "-m", module]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
            str(free_port()), "-m", module]


def start(args: list[str], ranks: int = 1, log: Path | None = None, module: str = "engine.run") -> subprocess.Popen:
    """`module` with `args` in a new session, output to `log` (or nowhere)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(ranks, module) + args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(args: list[str], ranks: int = 1, log: Path | None = None, module: str = "engine.run",
           timeout: float = 1800) -> int:
    return start(args, ranks, log, module).wait(timeout)


def wait_for_row(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 1800) -> None:
    """Until metrics.csv has a row at `step` or later (the run is then past it); AssertionError if
    the run ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # the run appends as this reads: a read that finds no step column (seen once, in a fresh clone's
        # suite: KeyError 'step') is tried again, as a row cut short is
        if metrics.is_file() and any((r.get("step") or "").isdigit() and int(r["step"]) >= step
                                     for r in read_rows(metrics)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def signal_tree(proc: subprocess.Popen, signum: int) -> int:
    """`signum` to the run's process and all its descendants; the run's exit code."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return proc.wait(300)


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc (Linux)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found += sorted(frontier)
    return found


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def results(run_dir: Path) -> dict:
    """results.json without the timings and the package versions (a version is None where the process
    did not import the package: an in-process reference run may have imported DALI, a --loader torch
    process does not)."""
    from engine.report import VERSION_KEYS
    return {k: v for k, v in json.loads((run_dir / "results.json").read_text()).items()
            if k not in TIMING_KEYS and k not in VERSION_KEYS}


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without the timing columns."""
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_rows(run_dir / "metrics.csv")]
