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
seconds, their split by phase and the processes so far, and a resumed process adds its own.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
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


# Where a run's time goes (results.json `time_s`), in the order a run meets them: `startup` (the
# interpreter, the imports, the processes, the start checks, the model built and its weights read,
# the loaders made, the run folder claimed), `data` (reading or scanning the data sets),
# `source_before` (the untouched backbone's source k-NN, and CLIP's zero-shot), `train` (the train
# loop, its set-up and its checkpoints), `validation` and `curve` (the evaluations inside the loop),
# `restore` (the best checkpoint back onto a fresh backbone), `measure` (test top-1, shift, source
# k-NN, inference cost of the restored model), `report` (the files and figures). `other` is what no
# phase holds: the earlier processes' time when a checkpoint from before time_s said only its sum.
PHASES = ("startup", "data", "source_before", "train", "validation", "curve", "restore", "measure", "report")


def process_age() -> float:
    """Seconds since this process started (the interpreter and the imports before any code of ours
    ran), from /proc on Linux at its clock tick (10 ms); 0 where /proc cannot say."""
    try:
        stat = Path("/proc/self/stat").read_text()
        started = int(stat[stat.rindex(")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class RunClock:
    """The run's wall time over its processes: the earlier ones' (each to its last full checkpoint, as
    the checkpoint resumed from says) plus this one's so far; and the same split by phase (`PHASES`):
    `enter` starts a phase, `within` lends the time of a block to another (validation inside training)."""
    carried_s: float = 0.0
    earlier: int = 0                  # processes before this one
    began: float = field(default_factory=time.perf_counter)
    carried_phases: dict = field(default_factory=dict)  # the earlier processes' seconds per phase
    spent: dict = field(default_factory=dict)           # this process's, up to `since`
    phase: str = "startup"
    since: float | None = None        # when `phase` began (None: at `began`)

    def carry(self, facts: dict) -> None:
        """Count the processes a checkpoint's (or facts.json's) facts say came before this one (none
        for empty facts: a process stopped before it finished anything)."""
        self.carried_s = float(facts.get("wall_s", 0.0))
        self.earlier = int(facts.get("processes", 1 if facts else 0))  # a checkpoint from before the count: one
        self.carried_phases = {p: float(v) for p, v in facts.get("time_s", {}).items() if p in PHASES}

    @property
    def processes(self) -> int:
        return self.earlier + 1

    def wall_s(self) -> float:
        return self.carried_s + time.perf_counter() - self.began

    def enter(self, phase: str) -> None:
        """From now on the time is `phase`'s (one of PHASES)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        now = time.perf_counter()
        self.spent = self._spent(now)
        self.phase, self.since = phase, now

    def _spent(self, now: float) -> dict:
        """This process's seconds per phase up to `now`, the current phase's included."""
        spent = dict(self.spent)
        spent[self.phase] = spent.get(self.phase, 0.0) + now - (self.began if self.since is None else self.since)
        return spent

    @contextlib.contextmanager
    def within(self, phase: str):
        """The block's time is `phase`'s, then the phase it interrupted goes on."""
        outer = self.phase
        self.enter(phase)
        try:
            yield
        finally:
            self.enter(outer)

    def facts(self) -> dict:
        """wall_s, processes and time_s (seconds per phase over all processes, and `other`), taken at
        one instant: the phases sum to wall_s (to rounding)."""
        now = time.perf_counter()
        wall = self.carried_s + now - self.began
        this = self._spent(now)
        times = {p: round(self.carried_phases.get(p, 0.0) + this.get(p, 0.0), 3) for p in PHASES}
        times["other"] = round(max(0.0, wall - sum(times.values())), 3)
        return {"wall_s": round(wall, 3), "processes": self.processes, "time_s": times}


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
