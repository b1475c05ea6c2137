"""Helpers for the durability tests: the run they stop and resume, runs in this process, and what
"nothing overwritten" compares. Runs in processes of their own come from bench.processes."""
from pathlib import Path

from bench.processes import read_rows

# Small and complete: selective LoRA's budget mode fixes its gates at step 3 of 6 (so a resume can
# start before or after the fix), a full checkpoint every 2 steps, a metrics row every step, the
# forgetting curve on a small subset (its rows are resumed too).
DURABLE = ["--strategy", "selective_lora", "--active-blocks", "4", "--steps", "6", "--eval-every", "3",
           "--checkpoint-every", "2", "--batch-size", "8", "--loader", "torch", "train.log_every=1",
           "data.knn_train_limit=100", "data.knn_test_limit=40", "data.workers=0", "eval.knn_curve_limit=40",
           "eval.throughput_iters=0"]
# Four steps, tiny k-NN banks and no forgetting curve: only the losses are compared.
EQUIVALENCE = ["--steps", "4", "--eval-every", "4", "--batch-size", "8", "--loader", "torch", "train.log_every=1",
               "data.knn_train_limit=20", "data.knn_test_limit=10", "data.workers=0", "eval.knn_curve_limit=0", "eval.throughput_iters=0"]


def run_here(args: list[str]) -> int:
    """`python -m engine.run` in this process, on one thread as the runs in processes (bench.processes)."""
    import torch
    from engine.run import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def losses(run_dir: Path) -> list[float]:
    """The training loss of each logged step (the forgetting curve's step-0 row has none)."""
    return [float(r["train_loss"]) for r in read_rows(run_dir / "metrics.csv") if r["train_loss"]]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time: what 'nothing overwritten' compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
