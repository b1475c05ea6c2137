"""`--resume RUN_DIR`: continue a stopped run in its own folder from its last full checkpoint.

The run's config is its own config.yaml, under any flags and key=value given now; a changed key
that would change the run (model, strategy, seed, batch, steps, ...) is refused in one line listing
them, while the keys in `MAY_CHANGE` may differ. The checkpoint is the newest that verifies
(`engine.checkpoint.choose`), chosen by rank 0 and told to the others. A run stopped before its
first full checkpoint (a signal in the source k-NN, a kill before the first eval) restarts training
from step 0 in its folder, with what it had finished (the untouched backbone's k-NN, in
`checkpoints/full/facts.json`). Everything here happens before any expensive work and writes
nothing but the folder's lock: a refused resume leaves the run's files exactly as they were.

The run's wall time is that of all its processes (`RunClock`): each full checkpoint carries the
seconds and the processes so far, and a resumed process adds its own.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .config import RunConfig, build_config, resume_yaml
from .dotted import flatten
from .errors import UserError
from .io import atomic_write_text

# Keys a resumed run may change: when and how it evaluates, logs and checkpoints, how it reads its
# data, where things are. (A changed eval cadence or loader gives a different, not a wrong, run.)
MAY_CHANGE = ("name", "out", "resume", "data.loader", "data.workers", "data.dali_resize", "data.data_root",
              "train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
              "train.kernels", "train.compile", "eval.batch_size", "eval.throughput_iters")


def check_config(cfg: RunConfig) -> None:
    """Refuse, in one line, a finished run, and the keys `cfg` changes from the run's saved config
    that would change the run."""
    if (Path(cfg.resume) / "results.json").exists():
        raise UserError(f"--resume {cfg.resume}: the run has finished (results.json); nothing to resume")
    saved = flatten(build_config(resume_yaml(cfg.resume)).to_dict())
    now = flatten(cfg.to_dict())
    changed = [f"{key} ({saved[key]!r} -> {now[key]!r})" for key in now
               if key not in MAY_CHANGE and now[key] != saved.get(key)]
    if changed:
        raise UserError(f"--resume {cfg.resume}: these keys differ from the run's config.yaml and would change "
                        f"the run: {', '.join(changed)}; start a new run for that")


def find_checkpoint(run_dir: Path, ident: dict, rank: int, world: int) -> tuple[Path | None, dict]:
    """The full checkpoint to resume from and its manifest, the same on every rank (UserError on all).
    A run that never wrote one restarts from step 0: (None, {"step": 0, "facts": what facts.json holds})."""
    outcome = [None]
    if rank == 0:
        try:
            outcome = [checkpoint.choose(run_dir, ident) if checkpoint.checkpoint_dirs(run_dir)
                       else (None, {"step": 0, "facts": checkpoint.early_facts(run_dir) or {}})]
        except UserError as e:
            outcome = [str(e)]
    if world > 1:
        torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], str):
        raise UserError(outcome[0])
    return outcome[0]


@dataclass
class RunClock:
    """The run's wall time over its processes: the earlier ones' (each to its last full checkpoint, as
    the checkpoint resumed from says) plus this one's so far."""
    carried_s: float = 0.0
    earlier: int = 0                  # processes before this one
    began: float = field(default_factory=time.perf_counter)

    def carry(self, facts: dict) -> None:
        """Count the processes a checkpoint's (or facts.json's) facts say came before this one (none
        for empty facts: a process stopped before it finished anything)."""
        self.carried_s = float(facts.get("wall_s", 0.0))
        self.earlier = int(facts.get("processes", 1 if facts else 0))  # a checkpoint from before the count: one

    @property
    def processes(self) -> int:
        return self.earlier + 1

    def wall_s(self) -> float:
        return self.carried_s + time.perf_counter() - self.began

    def facts(self) -> dict:
        return {"wall_s": round(self.wall_s(), 3), "processes": self.processes}


def rewind_metrics(run_dir: Path, step: int) -> None:
    """metrics.csv without the rows after `step` (written after the checkpoint the run resumes from;
    -1: every row, for a restart from step 0, which writes its step-0 row again)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        # a row cut short by a kill mid-write can only be the last, and comes after the checkpoint
        kept = [row for row in reader if None not in row.values() and int(row["step"]) <= step]
        columns = reader.fieldnames
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\r\n")  # csv's own line ending, as appended
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, out.getvalue())


def resume_command(run_dir: Path, world: int) -> str:
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node {world}"
    return f"{launcher} -m engine.run --resume {run_dir}"
