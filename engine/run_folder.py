"""The run folder: claimed atomically, owned by one live process, and never written into unless the
user asks.

A run folder is claimed by one `mkdir` that fails when the folder exists, so two runs started
together never share one. A default name (`<strategy>-<time>`) that is taken gets the first free
suffix (`-2`, `-3`, ...). An explicit `--name` that exists (a finished run, or an interrupted one
whose checkpoints matter) is refused unless the user says how to reuse it: `may_reuse` is the one
rule, and `REUSE` the ways it allows (`overwrite`: the old folder is removed first). The claimed
folder is held (`engine.folder_lock`) by the process that claimed it until it ends; a folder another
live process holds is never removed or written into.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .errors import UserError
from .folder_lock import FolderBusy, FolderLock, holder
from .io import folder_problem

REUSE = ("overwrite",)  # the ways to write into an existing run folder (--overwrite)


def default_name(strategy: str) -> str:
    return f"{strategy}-{time.strftime('%Y%m%d-%H%M%S')}"


def may_reuse(run_dir: Path, reuse: str | None) -> None:
    """The rule for an existing run folder: written into only when the user named a way (`REUSE`)."""
    if reuse is None:
        raise UserError(f"run folder {run_dir} already exists; pick another --name, or pass --overwrite "
                        f"to replace it")
    if reuse not in REUSE:
        raise ValueError(f"unknown way to reuse a run folder: {reuse!r}")


def check(out: str | Path, name: str | None, reuse: str | None = None) -> None:
    """Refuse, before any work and without creating anything, a run folder that cannot be claimed:
    `out` a file or not writable, or an explicit `name` that exists and may not be reused, or that
    another live process holds."""
    out = Path(out)
    problem = folder_problem(out)
    if problem:
        raise UserError(f"--out {out}: {problem}")
    if name is not None and (out / name).exists():
        may_reuse(out / name, reuse)
        live = holder(out / name)
        if live:
            raise FolderBusy(f"run folder {out / name} is in use by {live}: wait for it to end, or stop it first")


def claim(out: str | Path, name: str | None, strategy: str, reuse: str | None = None) -> FolderLock:
    """Create this run's folder under `out` and hold it (the lock's `folder`); UserError when it
    cannot be had."""
    out = Path(out)
    check(out, name, reuse)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if name is None:
            run_dir = _claim_free(out / default_name(strategy))
        else:
            run_dir = out / name
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                run_dir.mkdir()
            except FileExistsError:  # taken since the check, or a file of that name
                may_reuse(run_dir, reuse)
                if reuse == "overwrite":
                    _replace(run_dir)
        return FolderLock.take(run_dir, "run folder")
    except OSError as e:
        raise UserError(f"--out {out}: cannot create a run folder there ({e.strerror or e})") from None


def _claim_free(run_dir: Path) -> Path:
    """`run_dir`, or `run_dir-2`, `run_dir-3`, ...: the first name this process creates itself."""
    for n in range(1, 10_000):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"run folders {run_dir}-2 ... -9999 are all taken; pick a --name")


def _replace(run_dir: Path) -> None:
    """--overwrite: hold the old folder (refused while another live process does), move it aside (one
    rename), delete it, and claim the name afresh; a run that claimed the name in between keeps it."""
    old = FolderLock.take(run_dir, "run folder") if run_dir.is_dir() else None
    aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
    try:
        os.replace(run_dir, aside)
        if aside.is_dir():
            shutil.rmtree(aside)
        else:
            aside.unlink()
    finally:
        if old is not None:
            old.release()
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise UserError(f"run folder {run_dir} was claimed by another run while this one replaced it") from None
