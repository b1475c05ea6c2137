"""Helpers for the durability tests: runs of `python -m engine.run` (or torchrun) in real processes,
stopped with real signals at a chosen step, and the comparison of two runs' outputs."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"train_img_per_s", "infer_img_per_s", "peak_mem_mb", "wall_s"}
TIMING_COLUMNS = {"train_img_per_s", "elapsed_s"}

# Small and complete: selective LoRA's budget mode fixes its gates at step 3 of 6 (so a resume can
# start before or after the fix), a full checkpoint every 2 steps, a metrics row every step.
DURABLE = ["--strategy", "selective_lora", "--active-blocks", "4", "--steps", "6", "--eval-every", "3",
           "--checkpoint-every", "2", "--batch-size", "8", "--loader", "torch", "train.log_every=1",
           "data.knn_train_limit=100", "data.knn_test_limit=40", "data.workers=0"]


def run_here(args: list[str]) -> int:
    """`python -m engine.run` in this process, on one thread as the runs in processes (`start`)."""
    import torch
    from engine.run import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


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
    """A run in its own process group (so that a signal reaches torchrun's workers too)."""
    # one thread, as the in-process runs of the tests (the same arithmetic, and no spin-waiting);
    # a free port: the default one, derived from the pid, may be taken on a busy machine
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(ranks, module) + args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(args: list[str], ranks: int = 1, log: Path | None = None, module: str = "engine.run",
           timeout: float = 900) -> int:
    return start(args, ranks, log, module).wait(timeout)


def wait_for_row(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 900) -> None:
    """Until metrics.csv has the row of `step` (the run is then past it), or fail if the run ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(int(r["step"]) >= step for r in read_rows(metrics) if r["step"]):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def signal_group(proc: subprocess.Popen, signum: int) -> int:
    """`signum` to the run's process and all its descendants (torchrun starts each worker in a session
    of its own, so the process group alone does not reach them); the run's exit code."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return proc.wait(300)


def descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def results(run_dir: Path) -> dict:
    """results.json without the timings."""
    return {k: v for k, v in json.loads((run_dir / "results.json").read_text()).items() if k not in TIMING_KEYS}


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without the timing columns."""
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_rows(run_dir / "metrics.csv")]


def losses(run_dir: Path) -> list[float]:
    return [float(r["train_loss"]) for r in read_rows(run_dir / "metrics.csv")]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time: what 'nothing overwritten' compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
