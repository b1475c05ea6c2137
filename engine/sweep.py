"""`python -m engine.sweep`: a grid of `engine.run` runs in one folder, then the paper's table and figures.

    python -m engine.sweep --preset embedded                 # the paper's rows on the embedded default
    python -m engine.sweep --preset embedded --quick         # the six strategies' defaults, one LR
    python -m engine.sweep --preset paper --weights dino_vitbase16_pretrain.pth --data-root /data \\
        data.source=imagefolder:/data/imagenet --launcher submitit --partition gpu --gpus 1
    python -m engine.sweep --strategies lora,full --lrs 0.05,0.01 --steps 100

A thin launcher over the one entry point, as DINO's `run_with_submitit.py` is: every grid point (row x
learning rate x seed) is `python -m engine.run ...`, a normal run folder inside the sweep folder.
Arguments the sweep does not know go to every run (flags or `key=value`); the whole grid is checked
with engine.run's own parser before anything starts. Rows and learning rates come from `--preset`
(engine.presets) or `--strategies`; the table picks each row's learning rate by validation accuracy
(engine.sweep_report).

Interrupted sweeps continue: run the same command again. A finished run (results.json) is not redone,
nor one that diverged (exit 3, recorded in sweep.json), as long as it is what the sweep would run now:
its config.yaml (every key as engine.run resolved it) and its package versions match. A stale run is
listed (its name and first differing keys), moved to `stale/` in the sweep folder (nothing is deleted)
and run again; `--reuse-stale` keeps it instead, and the table names it. The untouched backbone's source
features are extracted by the first run of a backbone and source and reused by the others
(`engine.source_features`, in SWEEP/source_features). A run killed mid-way continues
(`restart_command`), and its log keeps the earlier attempts. One live sweep owns its folder
(`engine.folder_lock`): a second one on the same folder is refused in one line naming it, and a run
that another live process holds is left to it, never relaunched. Runs go to `--launcher local` (subprocesses, `--parallel N` at once, one GPU each
where there are GPUs) or `--launcher submitit` (one SLURM job per run, or submitit's local/debug
executors with `--cluster`).

A row can be a sequence (`presets.Row.sequence`, e.g. `--preset continual`): each of its grid points is
then `python -m engine.sequence --targets A,B,C --adapters merge|swap ...` with the same arguments, its
folder a sequence folder (a run folder per stage). It is done when its sequence.json is complete; a
partial one continues with the same command (engine.sequence resumes the stage it stopped in); it is
stale when sequence.json's identity (strategy, adapters, targets, arguments) differs from the row's now,
or a stage's config.yaml or package versions differ from what that stage would run now (its
`Sequence.stage_args`). The table gives its average accuracy, backward transfer and mean forgetting
beside the single runs' figures (engine.sweep_report). Its stages run one after another in one process:
under submitit a sequence row takes one GPU (`--gpus 1 --nodes 1`).

A row can be derived from another row's runs by weight interpolation (`presets.Row.interpolate`, e.g. the
`clip` preset's WiSE-FT alpha=0.5 of All): at each learning rate and seed of its source row, once that run
is finished, its point is `python -m engine.interpolate SOURCE_RUN --alphas A --out ITS_FOLDER`, so its
interpolation.csv / .png land in a folder of its own (`wise-ft-lr1e-05-s0`) and the source run's folder is
left as it was (its config and results are what the reuse check reads). It is done when its
interpolation.csv has a row at its alpha; stale when its source run's results.json is newer than that file
(the source was run again) or its source is to run now; it is launched after the grid's training runs, and not while its source is
unfinished. The table reads its figures at that alpha, and its learning rate follows the source row's
choice (engine.sweep_report).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from .config import FLAG_KEYS, RunConfig, parse_run_args
from .distributed import LAUNCHER_ENV, adopt_deepspeed_config
from .dotted import flatten
from .errors import UserError
from .folder_lock import FolderLock, holder
from .io import atomic_write_json
from .optim import resolved_lr
from .presets import PRESETS, Row, default_rows, get_preset
from .report import VERSION_KEYS, package_versions

LAUNCHERS = ("local", "submitit")
CLUSTERS = ("auto", "slurm", "local", "debug")  # submitit's executors; auto = SLURM where it is found
DIVERGED = 3  # engine.run's exit status for a run stopped by a non-finite loss or gradients
# What the sweep sets per run; the user cannot pass them through.
_OWNED = {"strategy", "train.lr", "seed", "name", "out", "dry_run", "json"}
_CODE_ROOT = str(Path(__file__).resolve().parents[1])  # the runs import the code the sweep imports


@dataclass(frozen=True)
class Point:
    """One run of the grid: a row at one learning rate and seed, and its engine.run arguments."""
    row: Row
    lr: float
    seed: int
    name: str
    args: tuple[str, ...]             # engine.run's argv, without --out/--name (a derived row's: its source's)
    source: "Point | None" = None     # a derived row's (Row.interpolate): the point it interpolates

    def run_dir(self, sweep_dir: Path) -> Path:
        return sweep_dir / self.name

    @property
    def module(self) -> str:
        """The entry point its command runs: engine.sequence for a sequence row, engine.interpolate for a
        derived one, engine.run otherwise."""
        if self.row.interpolate is not None:
            return "engine.interpolate"
        return "engine.run" if self.row.sequence is None else "engine.sequence"


def sequence_of(point: Point, sweep_dir: Path):
    """A sequence row's point as the engine.sequence.Sequence its command runs, checked as that command
    checks it (UserError otherwise)."""
    from .sequence import sequence_for
    spec = point.row.sequence
    return sequence_for(spec.targets, spec.adapters, point.args, point.run_dir(sweep_dir))


def build_grid(rows, seeds: list[int], base_args=(), extra=(), lrs: tuple[float, ...] | None = None,
               default_lrs: tuple[float, ...] = ()) -> list[Point]:
    """rows x learning rates x seeds. A row trains at `lrs` when given, else at its own (the linear
    probe's), else at `default_lrs`; the user's arguments `extra` come last, so they win. A derived row
    (Row.interpolate) gets a point per point of its source row, which must come before it in `rows`; the
    points are in the order of `rows`."""
    points = []
    for row in rows:
        if row.interpolate is not None:
            continue
        for lr in lrs or row.lrs or default_lrs:
            for seed in seeds:
                args = (*base_args, "--strategy", row.strategy, *row.args, "--lr", f"{lr:g}", "--seed", str(seed),
                        *extra)
                points.append(Point(row, lr, seed, f"{row.key}-lr{lr:g}-s{seed}", args))
    for row in rows:
        if row.interpolate is None:
            continue
        source = row.interpolate.source
        sources = [p for p in points if p.row.key == source and p.row.sequence is None]
        if not sources or rows.index(sources[0].row) > rows.index(row):
            raise UserError(f"row {row.key} interpolates row {source!r}, which is not a single-run row before it in "
                            f"this grid"
                            + (" (keep it in --rows)" if source not in {r.key for r in rows} else ""))
        points += [Point(row, p.lr, p.seed, f"{row.key}-lr{p.lr:g}-s{p.seed}", p.args, p) for p in sources]
    return sorted(points, key=lambda p: rows.index(p.row))  # stable: lr and seed order kept


INTERPOLATION_CSV = "interpolation.csv"


def interpolation_row(point: Point, run_dir: Path) -> dict | None:
    """A derived point's interpolation.csv row at its alpha (None: no such file or row yet)."""
    from .interpolate import row_at
    return row_at(run_dir, point.row.interpolate.alpha)


def run_command(point: Point, sweep_dir: Path) -> list[str]:
    """The command of a run that has not started (of a sequence row: the sequence)."""
    if point.source is not None:
        return [sys.executable, "-m", point.module, str(point.source.run_dir(sweep_dir)),
                "--alphas", f"{point.row.interpolate.alpha:g}", "--out", str(point.run_dir(sweep_dir))]
    spec = point.row.sequence
    head = [] if spec is None else ["--targets", ",".join(spec.targets), "--adapters", spec.adapters]
    return [sys.executable, "-m", point.module, *head, *point.args, "--out", str(sweep_dir), "--name", point.name]


def restart_command(point: Point, sweep_dir: Path) -> list[str]:
    """The command of a run that was stopped mid-way: `--resume` when it wrote its config (engine.run
    continues from the last full checkpoint that verifies, or from step 0 when it wrote none), else a
    fresh start in its folder (`--overwrite`: the run folder rules refuse an existing --name otherwise).
    A sequence, and a derived row, continues with its own command."""
    if point.row.sequence is not None or point.source is not None:
        return run_command(point, sweep_dir)
    if (point.run_dir(sweep_dir) / "config.yaml").is_file():
        return [sys.executable, "-m", "engine.run", "--resume", str(point.run_dir(sweep_dir))]
    return [*run_command(point, sweep_dir), "--overwrite"]


STATES = ("done", "diverged", "partial", "new", "running", "stale")


def state(point: Point, sweep_dir: Path, outcomes: dict[str, int]) -> str:
    """done (results.json), diverged (exit 3 on record), running (its folder held by a live process),
    partial (a folder without results) or new. A sequence is done when its sequence.json is complete, a
    derived row when its interpolation.csv has its alpha."""
    run_dir = point.run_dir(sweep_dir)
    if _finished(point, run_dir):
        return "done"
    if outcomes.get(point.name) == DIVERGED:
        return "diverged"
    if not run_dir.exists():
        return "new"
    return "running" if holder(run_dir) else "partial"


def _finished(point: Point, run_dir: Path) -> bool:
    if point.source is not None:
        return interpolation_row(point, run_dir) is not None
    if point.row.sequence is None:
        return (run_dir / "results.json").is_file()
    try:
        return bool(json.loads((run_dir / "sequence.json").read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


# -- reuse keyed on what ran --------------------------------------------------------------------------
# A run folder is reused only when the config it ran with (its config.yaml, every key as engine.run
# resolved it) and the package versions it recorded (results.json's VERSION_KEYS) are what this sweep
# would run now; otherwise it is stale: set aside and run again, or kept with --reuse-stale (and the
# table says so). Never mixed into one table unsaid.

# Keys that say where and how a run's process is driven, not what it computes.
_NOT_THE_RUN = ("name", "out", "resume", "overwrite", "verbose", "dry_run", "json", "world_size",
                "eval.source_cache")
# Keys engine.run fills from the target data set when they are unset (engine.config.resolved_for_target):
# the sweep does not read the data, so these are compared only where its runs set them.
_FROM_DATA = ("data.crop_scale_min", "data.hflip")
# Distributions of the packages a sweep process does not import (engine.report reads `__version__` in the
# run, which matches these distributions' versions).
_DISTRIBUTIONS = {"deepspeed_version": ("deepspeed",),
                  "dali_version": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")}


def expected_config(cfg: RunConfig, world: int) -> dict:
    """The flat config.yaml a run of `cfg` (its parsed arguments) would write now, as far as it is known
    without reading its data: the user's DeepSpeed JSON adopted for `world` processes and the learning
    rate resolved, as engine.run does; in config.yaml's own types (a YAML round trip)."""
    train, _ = adopt_deepspeed_config(cfg.train, world)
    cfg = replace(cfg, train=replace(train, lr_resolved=resolved_lr(train)))
    return flatten(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))


def config_differences(saved: dict, now: dict) -> list[str]:
    """The keys (flat) in which a run's saved config differs from what would run now, each with both values."""
    differ = []
    for key in dict.fromkeys([*now, *saved]):
        if key in _NOT_THE_RUN or (key in _FROM_DATA and now.get(key) is None and key in saved):
            continue
        if key not in saved:
            differ.append(f"{key} (not in its config.yaml; now {now[key]!r})")
        elif key not in now:
            differ.append(f"{key} (no longer a key; it had {saved[key]!r})")
        elif saved[key] != now[key]:
            differ.append(f"{key} ({saved[key]!r} -> {now[key]!r})")
    return differ


def installed_versions() -> dict[str, str | None]:
    """VERSION_KEYS as a run started now would record them (None: not installed)."""
    versions = package_versions()  # what this process imported (torch, timm, ...: every run imports them)
    for key, names in _DISTRIBUTIONS.items():
        if versions.get(key) is None:
            versions[key] = next((v for v in map(_distribution_version, names) if v), None)
    return versions


def _distribution_version(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_differences(results: dict, now: dict) -> list[str]:
    """The recorded package versions that differ from `now`'s (a package the run did not import, None, is
    not compared)."""
    return [f"{key} ({results[key]} -> {now.get(key) or 'not installed'})" for key in VERSION_KEYS
            if results.get(key) is not None and results[key] != now.get(key)]


def staleness(point: Point, sweep_dir: Path, now: dict, versions: dict) -> list[str]:
    """Why the run folder of `point` does not hold what this sweep would run now (empty: it does);
    `now` is its `expected_config`."""
    return folder_staleness(point.run_dir(sweep_dir), now, versions)


def folder_staleness(run_dir: Path, now: dict, versions: dict) -> list[str]:
    """Why the run folder `run_dir` does not hold a run of the config `now` with `versions` (empty: it does)."""
    try:
        saved = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except FileNotFoundError:
        return ["no config.yaml"]
    except (OSError, yaml.YAMLError, AttributeError) as e:
        return [f"config.yaml unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"]
    differ = config_differences(saved, now)
    if (run_dir / "results.json").is_file():
        try:
            differ += version_differences(json.loads((run_dir / "results.json").read_text()), versions)
        except (OSError, ValueError) as e:
            differ.append(f"results.json unreadable ({e})")
    return differ


def sequence_staleness(point: Point, sweep_dir: Path, versions: dict) -> list[str]:
    """Why a sequence row's folder does not hold the sequence it would run now (empty: it does):
    sequence.json's identity (strategy, adapters, targets, arguments; engine.sequence itself refuses a
    folder that differs), else each stage run's config.yaml and versions against that stage's arguments.
    Its stages run in one process (world 1)."""
    seq = sequence_of(point, sweep_dir)
    try:
        record = json.loads((seq.folder / "sequence.json").read_text())
    except FileNotFoundError:
        record = None
    except (OSError, ValueError) as e:
        return [f"sequence.json unreadable ({e})"]
    if record is not None:
        differ = [f"{k} ({record.get(k)!r} -> {v!r})" for k, v in seq.identity().items() if record.get(k) != v]
        if differ:
            return differ
    differ = []
    for t in range(len(seq.targets)):
        if (seq.run_dir(t) / "config.yaml").is_file():
            now = expected_config(parse_run_args(seq.stage_args(t), "the stages' arguments"), 1)
            differ += [f"{seq.stage_name(t)}: {why}" for why in folder_staleness(seq.run_dir(t), now, versions)]
    return differ


def derived_staleness(point: Point, sweep_dir: Path) -> list[str]:
    """Why a derived row's folder does not hold the interpolation of its source run as it is now (empty: it
    does): the source's results.json is newer than its interpolation.csv (the source ran again)."""
    try:
        made = (point.run_dir(sweep_dir) / INTERPOLATION_CSV).stat().st_mtime
        source = (point.source.run_dir(sweep_dir) / "results.json").stat().st_mtime
    except OSError:
        return []  # not written yet, or its source unfinished: nothing to compare
    return [f"{point.source.name}/results.json is newer than its {INTERPOLATION_CSV}"] if source > made else []


def find_stale(grid: list[Point], sweep_dir: Path, states: dict[str, str], world: int) -> dict[str, list[str]]:
    """name -> why, for each run of the grid whose folder (finished, diverged or partial; a live run is
    left alone) holds another config or versions than this sweep would run now."""
    versions, stale = None, {}
    for point in grid:
        if states[point.name] not in ("done", "diverged", "partial"):
            continue
        if point.source is not None:
            why = derived_staleness(point, sweep_dir)
            if why:
                stale[point.name] = why
            continue
        versions = versions or installed_versions()
        if point.row.sequence is not None:
            why = sequence_staleness(point, sweep_dir, versions)
        elif not (point.run_dir(sweep_dir) / "config.yaml").is_file() and states[point.name] == "partial":
            continue  # stopped before it wrote its config: it starts afresh anyway (restart_command)
        else:
            now = expected_config(parse_run_args(point.args, "the runs' arguments"), world)
            why = staleness(point, sweep_dir, now, versions)
        if why:
            stale[point.name] = why
    return stale


def stale_derived(grid: list[Point], states: dict[str, str]) -> dict[str, list[str]]:
    """name -> why, for each derived point whose folder holds an interpolation (done or partial) of a source
    run that is to run (again) now: what it holds would be of the run set aside."""
    return {p.name: [f"its source {p.source.name} is to run again"] for p in grid
            if p.source is not None and states[p.name] in ("done", "partial")
            and states[p.source.name] in ("new", "partial", "stale")}


def stale_line(name: str, why: list[str], most: int = 3) -> str:
    return f"stale run {name}: " + "; ".join(why[:most]) + (f"; and {len(why) - most} more" if len(why) > most else "")


def set_aside(run_dir: Path, sweep_dir: Path) -> Path:
    """Move a stale run folder to sweep_dir/stale/<name> (-2, -3, ... where taken), holding it meanwhile
    (engine.folder_lock: refused, naming the holder, while a live process holds it). Nothing is deleted."""
    with FolderLock.take(run_dir, "run folder"):
        aside_dir = sweep_dir / "stale"
        aside_dir.mkdir(exist_ok=True)
        for n in range(1, 10_000):
            aside = aside_dir / (run_dir.name if n == 1 else f"{run_dir.name}-{n}")
            if not aside.exists():
                os.rename(run_dir, aside)
                return aside
    raise UserError(f"{sweep_dir / 'stale'} holds 9,999 copies of {run_dir.name}; clear it")


# -- launchers ------------------------------------------------------------------------------------------

def _child_env(gpu: int | None, threads: int | None) -> dict[str, str]:
    """A local run's environment: ours, without a launcher's rank variables (each run is one process)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONPATH"] = os.pathsep.join([_CODE_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _death_signal():
    """A preexec_fn that makes a child get SIGTERM when the sweep dies, even by SIGKILL (Linux), so that
    no run goes on unseen and finishes beside its own restart; None elsewhere. libc is loaded here, in
    the parent: the child only makes the one call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count()


def launch_local(jobs: list[tuple[Point, list[str]]], parallel: int, log_dir: Path, on_done) -> None:
    """Run `jobs` as subprocesses, `parallel` at once; a GPU each where there are GPUs (slot i gets
    CUDA_VISIBLE_DEVICES=i), else an equal share of the CPU threads. `on_done(point, returncode)`."""
    gpus = _gpu_count()
    if gpus and parallel > gpus:
        raise UserError(f"--parallel {parallel} needs {parallel} GPUs; this machine has {gpus}")
    threads = None if gpus or parallel == 1 else max(1, (os.cpu_count() or 1) // parallel)
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running = list(jobs), {}  # slot -> (point, process, log file, start)
    preexec = _death_signal()
    try:
        while pending or running:
            for slot in range(parallel):
                if slot not in running and pending:
                    point, cmd = pending.pop(0)
                    log = _open_log(log_dir / f"{point.name}.log", cmd)
                    env = _child_env(slot if gpus else None, threads)
                    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               preexec_fn=preexec)
                    running[slot] = (point, process, log, time.perf_counter())
            time.sleep(0.2)
            for slot, (point, process, log, start) in list(running.items()):
                if process.poll() is not None:
                    log.close()
                    del running[slot]
                    on_done(point, process.returncode, time.perf_counter() - start)
    finally:  # interrupted: stop the runs too (they restart on the next call)
        for point, process, log, _ in running.values():
            process.terminate()
        for point, process, log, _ in running.values():
            process.wait()
            log.close()


def _open_log(path: Path, cmd: list[str]):
    """A run's log, opened for this attempt and headed by its command; an earlier attempt's lines stay
    above, and a later attempt starts after a line that numbers it."""
    earlier = path.read_text(errors="replace").count("\n----- attempt ") + 1 if path.is_file() and path.stat().st_size else 0
    log = open(path, "a")
    if earlier:
        log.write(f"\n----- attempt {earlier + 1}, {time.strftime('%Y-%m-%d %H:%M:%S')} -----\n")
    log.write(shlex.join(cmd) + "\n")
    log.flush()
    return log


class SweepJob:
    """One run as a submitit job: engine.run's `main` (engine.sequence's for a sequence row) in each task
    (one task per GPU), the distributed environment taken from the job; on pre-emption submitit requeues
    it with the restart command."""

    def __init__(self, argv: list[str], restart_argv: list[str], module: str = "engine.run") -> None:
        self.argv, self.restart_argv, self.module = argv, restart_argv, module

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
                          MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(20000 + zlib.crc32(str(env.job_id).encode()) % 20000))
        if self.module == "engine.sequence":
            from .sequence import main
        elif self.module == "engine.interpolate":
            from .interpolate import main
        else:
            from .run import main
        return main(self.argv)

    def checkpoint(self):
        import submitit
        return submitit.helpers.DelayedSubmission(SweepJob(self.restart_argv, self.restart_argv, self.module))


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--launcher submitit needs submitit: pip install 'vit-forget-not[cluster]'") from None
    return submitit


def launch_submitit(jobs: list[tuple[Point, list[str], list[str]]], folder: Path, args, on_done) -> None:
    """Submit each run as a job (SLURM, or submitit's local / debug executor) and wait for them all."""
    submitit = _submitit()
    os.environ["PYTHONPATH"] = _child_env(None, None)["PYTHONPATH"]  # jobs inherit the environment
    executor = submitit.AutoExecutor(folder=str(folder), cluster=None if args.cluster == "auto" else args.cluster)
    executor.update_parameters(timeout_min=args.time, nodes=args.nodes, gpus_per_node=args.gpus,
                               tasks_per_node=max(1, args.gpus), slurm_partition=args.partition)
    started = {}
    for point, argv, restart_argv in jobs:
        executor.update_parameters(name=point.name)
        job = executor.submit(SweepJob(argv, restart_argv, point.module))
        started[job.job_id] = (point, job, time.perf_counter())
        print(f"submitted {point.name}: job {job.job_id}", flush=True)
    # SLURM's state comes from sacct, which clusters ask you not to hammer: submitit's 10 s. Local and
    # debug jobs are processes here: a finished one is seen within half a second.
    poll = 10.0 if executor.cluster == "slurm" else 0.5
    for job in submitit.helpers.as_completed([j for _, j, _ in started.values()], poll_frequency=poll):
        point, _, start = started[job.job_id]
        try:
            code = job.results()[0]
        except Exception as e:  # the job failed outside engine.run (killed, timed out, ...): its log says why
            print(f"{point.name}: job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e) else e!r}")
            code = 1
        on_done(point, code, time.perf_counter() - start)


# -- the sweep -------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.sweep", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                epilog="Any other argument (an engine.run flag or key=value) goes to every run.")
    p.add_argument("--preset", choices=tuple(PRESETS), help="rows and learning rates (engine.presets)")
    p.add_argument("--strategies", help="comma list: one row per strategy at its defaults (instead of --preset)")
    p.add_argument("--quick", action="store_true", help="the six strategies' defaults at the preset's one quick LR")
    p.add_argument("--rows", help="comma list of row keys to keep (see --dry-run)")
    p.add_argument("--lrs", help="comma list of learning rates for every row (default: the preset's)")
    p.add_argument("--seeds", default="1", help=f"{SEEDS_FORMS} (default: 1, seed 0 alone)")
    p.add_argument("--out", help="the sweep folder (default: runs/sweep-<preset>; runs already there are kept)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local")
    p.add_argument("--parallel", type=int, default=1, help="local: runs at once (one GPU each where there are GPUs)")
    p.add_argument("--cluster", choices=CLUSTERS, default="auto", help="submitit: the executor")
    p.add_argument("--partition", help="submitit: the SLURM partition")
    p.add_argument("--gpus", type=int, default=1, help="submitit: GPUs per job (one task each)")
    p.add_argument("--nodes", type=int, default=1, help="submitit: nodes per job")
    p.add_argument("--time", type=int, default=24 * 60, help="submitit: time limit per job, minutes")
    p.add_argument("--reuse-stale", action="store_true",
                   help="keep runs whose config or package versions differ from what would run now (the table "
                        "names them) instead of setting them aside and running them again")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their commands; start nothing")
    return p


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} must be a comma list of numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise UserError(f"{what} must list positive numbers, got {text!r}")
    return values


_COUNT = re.compile(r"\d+")
_SEED_RANGE = re.compile(r"(\d+)-(\d+)")
SEEDS_FORMS = "a count N (3 = seeds 0,1,2) or a comma list of seeds and ranges A-B (0,1,2 or 0-2; 5-5: seed 5 alone)"


def parse_seeds(text: str) -> list[int]:
    """`--seeds`: `3` the first three seeds (0, 1, 2); `0-2` every seed from 0 to 2; `0,1,2` or `0-2,7`
    those seeds (a form with a comma is always a list, so `5,` is seed 5). Each seed once, in the order
    given; UserError naming the item for any other form."""
    text = text.strip()
    if _COUNT.fullmatch(text):
        if int(text) == 0:
            raise UserError(f"--seeds 0 runs no seed (a bare number is a count: 1 = seed 0 alone); give {SEEDS_FORMS}")
        return list(range(int(text)))
    seeds: list[int] = []
    for item in (i.strip() for i in text.split(",")):
        if not item and "," in text:
            continue
        if _COUNT.fullmatch(item):
            new = [int(item)]
        elif _SEED_RANGE.fullmatch(item):
            start, stop = map(int, _SEED_RANGE.fullmatch(item).groups())
            if start > stop:
                raise UserError(f"--seeds: range {item!r} runs backwards; write it as {stop}-{start}")
            new = list(range(start, stop + 1))
        else:
            raise UserError(f"--seeds: {item!r} is not a seed or a range; give {SEEDS_FORMS}")
        repeated = sorted(set(new) & set(seeds))
        if repeated:
            raise UserError(f"--seeds {text}: seed {repeated[0]} is given twice")
        seeds += new
    if not seeds:
        raise UserError(f"--seeds {text!r} names no seed; give {SEEDS_FORMS}")
    return seeds


def _check_extra(extra: list[str]) -> None:
    for item in extra:
        key = FLAG_KEYS.get(item[2:].replace("-", "_")) if item.startswith("--") else item.split("=", 1)[0]
        if key in _OWNED:
            raise UserError(f"{item.split('=', 1)[0]} is set by the sweep for each run; use its own flags "
                            f"(--preset/--strategies, --lrs, --seeds, --out)")


def plan(argv: list[str] | None):
    """Parse the command line into (args, preset or None, grid, sweep folder); every run's arguments are
    checked with engine.run's parser here, before anything starts."""
    args, extra = _parser().parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if (args.preset is None) == (args.strategies is None):
        raise UserError("give --preset NAME or --strategies LIST (one of them)")
    if args.parallel < 1 or args.gpus < 0 or args.nodes < 1 or args.time < 1:
        raise UserError("--parallel, --nodes and --time must be positive and --gpus at least 0")
    _check_extra(extra)
    preset = get_preset(args.preset) if args.preset else None
    rows = preset.rows if preset else default_rows([s.strip() for s in args.strategies.split(",") if s.strip()])
    lrs = _floats(args.lrs, "--lrs") if args.lrs else None
    if args.quick:
        if preset is None or not preset.quick_rows:
            raise UserError("--quick works with a preset that has quick rows (paper, embedded)")
        rows = tuple(preset.row(k) for k in preset.quick_rows)
        lrs = lrs or (preset.quick_lr,)
    if args.rows:
        keep = [k.strip() for k in args.rows.split(",") if k.strip()]
        unknown = [k for k in keep if k not in {r.key for r in rows}]
        if unknown:
            raise UserError(f"unknown row {unknown[0]!r}; rows: {', '.join(r.key for r in rows)}")
        rows = tuple(r for r in rows if r.key in keep)
    if lrs is None and preset is None:
        raise UserError("--strategies needs --lrs")
    seeds = parse_seeds(args.seeds)
    grid = build_grid(rows, seeds, preset.base_args if preset else (), extra, lrs, preset.lrs if preset else ())
    configs = {p.name: parse_run_args(p.args, "the runs' arguments") for p in grid}
    if preset is not None and preset.needs_source and next(iter(configs.values())).data.source == "embedded":
        raise UserError(f"--preset {preset.name} measures forgetting on ImageNet: give its folder, "
                        f"data.source=imagefolder:DIR (DIR/train/<class>/..., DIR/val/<class>/...)")
    sweep_dir = Path(args.out or f"runs/sweep-{args.preset or 'custom'}")  # --quick's runs are the full grid's too
    sequences = [p for p in grid if p.row.sequence is not None]
    if sequences and args.launcher == "submitit" and max(1, args.gpus) * args.nodes > 1:
        raise UserError(f"row {sequences[0].row.key} is a sequence, whose stages run in one process: give --gpus 1 "
                        f"--nodes 1 (or leave its rows out with --rows)")
    for point in sequences:
        sequence_of(point, sweep_dir)  # checked as engine.sequence checks its command line
    return args, preset, grid, sweep_dir


def _read_record(sweep_dir: Path, grid: list[Point]) -> tuple[dict[str, dict], dict[str, int]]:
    """The folder's runs on record (name -> entry) and their exit codes, after checking that the runs
    this grid shares with earlier sweeps in the folder had the same arguments."""
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        return {}, {}
    record = json.loads(path.read_text())
    earlier = {r["name"]: r for r in record.get("runs", [])}
    for point in grid:
        if point.name in earlier and earlier[point.name]["args"] != list(point.args) \
                and point.run_dir(sweep_dir).exists():
            raise UserError(f"sweep folder {sweep_dir} ran {point.name} with other arguments "
                            f"({shlex.join(earlier[point.name]['args'])}); give another --out or remove that run folder")
    return earlier, {k: int(v) for k, v in record.get("outcomes", {}).items()}


def _write_record(sweep_dir: Path, earlier: dict[str, dict], grid: list[Point], outcomes: dict[str, int]) -> None:
    """sweep.json: every run this folder has held (earlier sweeps' too, so that a later grid sharing a run
    is checked against it) and the exit codes on record."""
    runs = {**earlier, **{p.name: {"name": p.name, "row": p.row.key, "lr": p.lr, "seed": p.seed, "args": list(p.args)}
                          for p in grid}}
    atomic_write_json(sweep_dir / "sweep.json", {"runs": list(runs.values()), "outcomes": outcomes})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SystemExit: the launchers stop their runs
    try:
        return _sweep(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sweep(argv: list[str]) -> int:
    try:
        args, preset, grid, sweep_dir = plan(argv)
        if args.dry_run:
            return _dry_run(args, grid, sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with FolderLock.take(sweep_dir, "sweep folder"):
            return _run_grid(args, preset, grid, sweep_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def _world(args) -> int:
    """The processes each run has: one locally, one task per GPU of each node under submitit."""
    return 1 if args.launcher == "local" else max(1, args.gpus) * args.nodes


def _dry_run(args, grid: list[Point], sweep_dir: Path) -> int:
    """The runs, their states and commands; nothing is started or written. A stale run shows the
    command it would run again with (or its reuse, with --reuse-stale)."""
    _, outcomes = _read_record(sweep_dir, grid)
    states = {p.name: state(p, sweep_dir, outcomes) for p in grid}
    stale = find_stale(grid, sweep_dir, states, _world(args))
    for name, why in stale.items():
        print(stale_line(name, why) + ("; kept (--reuse-stale)" if args.reuse_stale else "; would run again"))
        if not args.reuse_stale:
            states[name] = "stale"
    for name, why in stale_derived(grid, states).items():
        print(stale_line(name, why) + "; would run again")
        states[name] = "stale"
    for p in grid:
        cmd = restart_command(p, sweep_dir) if states[p.name] == "partial" else run_command(p, sweep_dir)
        print(f"[{states[p.name]}] {p.name}: {shlex.join(cmd[1:])}")
    counts = {k: sum(s == k for s in states.values()) for k in STATES}
    shown = [f"{n} {k}" for k, n in counts.items() if n or k not in ("running", "stale")]
    print(f"{len(grid)} runs: " + ", ".join(shown))
    return 0


def _run_grid(args, preset, grid: list[Point], sweep_dir: Path) -> int:
    """Launch the grid's runs that are still to do, then write the report (the sweep folder is held)."""
    earlier, outcomes = _read_record(sweep_dir, grid)
    states = {p.name: state(p, sweep_dir, outcomes) for p in grid}
    stale = find_stale(grid, sweep_dir, states, _world(args))
    for name, why in stale.items():
        if args.reuse_stale:
            print(stale_line(name, why) + "; kept (--reuse-stale)", flush=True)
            continue
        aside = set_aside(sweep_dir / name, sweep_dir)
        outcomes.pop(name, None)
        states[name] = "new"
        print(stale_line(name, why) + f"; set aside in {aside}, to run again", flush=True)
    for name, why in stale_derived(grid, states).items():  # of a source set aside just now, or unfinished
        aside = set_aside(sweep_dir / name, sweep_dir)
        outcomes.pop(name, None)
        states[name] = "new"
        print(stale_line(name, why) + f"; set aside in {aside}, to run again", flush=True)
    _write_record(sweep_dir, earlier, grid, outcomes)
    todo = [p for p in grid if states[p.name] in ("new", "partial")]
    live = [p.name for p in grid if states[p.name] == "running"]
    print(f"sweep {sweep_dir}: {len(grid)} runs, {len(grid) - len(todo) - len(live)} finished before, {len(todo)} to run"
          + (f", {len(live)} held by another process ({', '.join(live[:3])})" if live else ""), flush=True)
    finished = [0]

    def on_done(point: Point, code: int, seconds: float) -> None:
        outcomes[point.name] = code
        _write_record(sweep_dir, earlier, grid, outcomes)
        finished[0] += 1
        what = "done" if code == 0 else "diverged" if code == DIVERGED else f"failed (exit {code})"
        print(f"[{finished[0]}/{len(todo)}] {point.name}: {what} in {seconds:.0f} s", flush=True)

    def command(point: Point) -> list[str]:
        return (restart_command if states[point.name] == "partial" else run_command)(point, sweep_dir)

    def launch(points: list[Point]) -> None:
        if not points:
            return
        if args.launcher == "local":
            launch_local([(p, command(p)) for p in points], args.parallel, sweep_dir / "logs", on_done)
        else:
            launch_submitit([(p, command(p)[3:], restart_command(p, sweep_dir)[3:]) for p in points],
                            sweep_dir / "submitit", args, on_done)

    launch([p for p in todo if p.source is None])
    # derived rows once their sources are finished (the others wait for the next call)
    ready = [p for p in todo if p.source is not None and state(p.source, sweep_dir, outcomes) == "done"]
    waiting = [p.name for p in todo if p.source is not None and p not in ready]
    if waiting:
        print(f"{len(waiting)} derived runs wait for their source runs ({', '.join(waiting[:3])})", flush=True)
    launch(ready)
    from .sweep_report import write_report
    print(write_report(sweep_dir, grid, preset, outcomes, stale if args.reuse_stale else {}))
    failed = [p.name for p in grid if state(p, sweep_dir, outcomes) in ("new", "partial", "running")]
    if failed:
        print(f"error: {len(failed)} runs did not finish ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); "
              f"their logs are in {sweep_dir / 'logs'}; run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
