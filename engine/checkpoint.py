"""Full checkpoints for `--resume`: DeepSpeed's own state plus what it does not store, written
atomically, with a manifest that resume verifies before it loads anything.

    checkpoints/full/step-00000050/
        deepspeed/        engine.save_checkpoint: the trainable parameters (frozen ones excluded:
                          megabytes for LoRA, not the backbone), the optimiser or its ZeRO shards,
                          the scheduler, DeepSpeed's step counters, and as client_state the
                          trainer's state (step, best step and accuracy, the strategy's state)
        rank-<r>.pt       per rank: RNG states (python, numpy, torch CPU and CUDA; DeepSpeed
                          stores none), the data position, the loss summed since the last log point
        manifest.json     written last: what the checkpoint is for (model, strategy, the trainable
                          names, world size, ZeRO stage), facts the rest of the run needs, and the
                          size and SHA-256 of every other file

Before the first checkpoint, `checkpoints/full/facts.json` holds the same facts (the untouched
backbone's k-NN, measured before training), so that a run stopped before it can restart training
from step 0 without measuring them again.

Every rank writes into `.step-00000050.tmp/`; once all have finished, rank 0 writes the manifest and
renames the folder into place, then retires the oldest beyond `keep`. A folder without a manifest
never was a checkpoint; one whose files do not match their manifest, or that was written for another
model, strategy or world size, is rejected with one line naming the file and the reason, and resume
falls back to the one before it (`choose`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .io import atomic_write_json

DEEPSPEED_TAG = "deepspeed"
MANIFEST = "manifest.json"
FACTS = "facts.json"
_FORMAT = 1
_PREFIX = "step-"


class CheckpointRejected(Exception):
    """A checkpoint that must not be loaded; the message names the file and the reason."""


def full_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "full"


def identity(model_name: str, strategy: str, num_classes: int, trainable: list[str], world: int,
             zero_stage: int) -> dict:
    """What a checkpoint must agree with to be loaded into a run (`trainable`: the names the
    optimiser was built over, which also fixes the model's structure: block positions, LoRA targets)."""
    return {"model": model_name, "strategy": strategy, "num_classes": num_classes, "world": world,
            "zero_stage": zero_stage, "trainable_params": len(trainable),
            "trainable_sha256": hashlib.sha256("\n".join(trainable).encode()).hexdigest()}


class FullCheckpoints:
    """Writes the full checkpoints of one run (every rank holds one; `save` is collective). Each
    manifest carries `facts`, and the run's wall time so far from `clock` (an engine.resume.RunClock)."""

    def __init__(self, run_dir: Path, ident: dict, facts: dict, rank: int, world: int, keep: int,
                 clock=None) -> None:
        self.folder, self.identity, self.facts, self.clock = full_dir(run_dir), ident, facts, clock
        self.rank, self.world, self.keep = rank, world, keep

    def _facts(self) -> dict:
        return {**self.facts, **(self.clock.facts() if self.clock is not None else {})}

    def save_facts(self) -> None:
        """facts.json: the facts before any checkpoint holds them (rank 0 writes it)."""
        if self.rank == 0:
            atomic_write_json(self.folder / FACTS, self._facts())

    def save(self, engine, step: int, trainer_state: dict, rank_state: dict) -> Path:
        final = self.folder / f"{_PREFIX}{step:08d}"
        tmp = self.folder / f".{final.name}.tmp"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".*"):  # writes and removals that were killed midway
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier(self.world)
        engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state={"trainer": trainer_state},
                               save_latest=False, exclude_frozen_parameters=True)
        torch.save(rank_state, tmp / f"rank-{self.rank}.pt")
        _barrier(self.world)
        if self.rank == 0:
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            atomic_write_json(tmp / MANIFEST, {"format": _FORMAT, "step": step, "identity": self.identity,
                                               "facts": self._facts(), "files": files})
            if final.exists():  # one that resume rejected: the new one replaces it
                _retire(final)
            os.rename(tmp, final)
            for old in checkpoint_dirs(self.folder.parent.parent)[self.keep:]:
                _retire(old)
        _barrier(self.world)
        return final


def early_facts(run_dir: Path) -> dict | None:
    """The facts a run wrote before its first full checkpoint (facts.json), or None."""
    try:
        return json.loads((full_dir(run_dir) / FACTS).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders (renamed into place, so once complete), newest first."""
    folder = full_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)


def verify(path: Path, ident: dict) -> dict:
    """The manifest of the checkpoint at `path` once its identity and every file check out;
    CheckpointRejected naming the file and the reason otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointRejected(f"{manifest_path} is missing (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise CheckpointRejected(f"{manifest_path} is not valid JSON") from None
    if manifest.get("format") != _FORMAT:
        raise CheckpointRejected(f"{manifest_path} has format {manifest.get('format')!r}, this engine reads {_FORMAT}")
    theirs = manifest["identity"]
    if theirs["world"] != ident["world"]:
        raise CheckpointRejected(
            f"{path} was written by {theirs['world']} rank(s) and this run has {ident['world']}: resume on "
            f"{theirs['world']} (DeepSpeed loads ZeRO-sharded optimiser state only at the data-parallel size "
            f"that wrote it, unless converted to a universal checkpoint with its ds_to_universal.py, which "
            f"this engine does not load)")
    for key in ("model", "strategy", "num_classes", "zero_stage", "trainable_params", "trainable_sha256"):
        if theirs[key] != ident[key]:
            raise CheckpointRejected(f"{path} was written for {key} {theirs[key]!r}, this run has {ident[key]!r}")
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointRejected(f"{file} is missing")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointRejected(f"{file} holds {size} bytes, its manifest says {meta['bytes']} (truncated?)")
        if _sha256(file) != meta["sha256"]:
            raise CheckpointRejected(f"{file} does not match its checksum (corrupt)")
    return manifest


def choose(run_dir: Path, ident: dict, say=print) -> tuple[Path, dict]:
    """The newest checkpoint that verifies and its manifest; each newer one rejected is `say`d in
    one line first. UserError when none verifies."""
    rejected = []
    for path in checkpoint_dirs(run_dir):
        try:
            manifest = verify(path, ident)
        except CheckpointRejected as e:
            rejected.append(str(e))
            continue
        for reason in rejected:
            say(f"note: rejected checkpoint: {reason}")
        if rejected:
            say(f"note: falling back to the previous complete checkpoint, {path}")
        return path, manifest
    if not rejected:
        raise UserError(f"{full_dir(run_dir)} holds no complete checkpoint to resume from")
    if len(rejected) == 1:
        raise UserError(f"cannot resume: {rejected[0]}")
    for reason in rejected:
        say(f"note: rejected checkpoint: {reason}")
    raise UserError(f"cannot resume: none of the {len(rejected)} checkpoints in {full_dir(run_dir)} verifies")


def load_rank_state(path: Path, rank: int) -> dict:
    return torch.load(path / f"rank-{rank}.pt", map_location="cpu", weights_only=False)


def rng_state() -> dict:
    """This process's random generators: what DeepSpeed's checkpoint leaves out."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _retire(path: Path) -> None:
    """Remove a checkpoint folder so that no half-removed one is ever found: rename first."""
    trash = path.with_name(f".{path.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
