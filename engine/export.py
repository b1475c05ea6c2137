"""`python -m engine.export RUN_DIR --merged OUT.safetensors`: a fine-tuned model that timm alone can load.

Rebuilds the run's base backbone (from its config.yaml), loads the run's adapter onto it (the
finished run's `adapter/`, or with `--checkpoint best|last` a checkpoint of a run that did not
finish), finalises it (LoRA merged into the frozen weights, inactive selective-LoRA blocks dropped,
expanded blocks kept as ordinary blocks) and writes a plain timm state dict. Next to it, OUT.json
holds what timm needs (`engine.models.timm_spec`): the model name with its pretrained tag, the
kwargs that rebuild the architecture (depth includes any expanded blocks; num_classes the head) and
`pretrained_cfg`, the preprocessing the engine used; the same entries are in the safetensors
metadata. Both are written atomically. An existing OUT or OUT.json is replaced only with
`--overwrite`, and a file of the run itself (its results.json, config.yaml, metrics.csv, anything
under adapter/ or checkpoints/, its base weights) never is: each refused in one line before the
model is built. Loading it needs nothing from this project (the README's "Load an exported model
with timm" shows it, on an image):

    spec = json.load(open("OUT.json"))
    model = timm.create_model(spec["name"], pretrained=False, pretrained_cfg_overlay=spec["pretrained_cfg"],
                              **spec["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("OUT.safetensors"))
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch import nn

from .adapter_files import CONFIG
from .config import build_config
from .errors import UserError
from .folder_lock import holder
from .io import atomic_write_json, atomic_write_safetensors, folder_problem
from .models import restore_model, timm_spec

CHECKPOINTS = ("best", "last")  # run_dir/checkpoints/<tag>, as engine.run's train loop writes them
# What a run writes in its folder (DESIGN.md, "Run artefacts"; engine.run, engine.report, engine.train):
# an export never replaces one of these, nor anything under the folders, --overwrite or not.
RUN_FILES = ("config.yaml", "results.json", "results.csv", "metrics.csv", "source_knn.json", "forgetting.png",
             "zeroshot.png", "zeroshot_head.safetensors", "interpolation.csv", "interpolation.png")
RUN_FOLDERS = ("adapter", "checkpoints")


def write_merged(model: nn.Module, out: str | Path, strategy_name: str, overwrite: bool = False) -> dict:
    """Write `model`'s state dict to `out` and its timm spec to `out` with a .json suffix, each
    atomically; return the sidecar. An existing file is replaced only with `overwrite`.

    The spec comes from the model itself (`timm_spec`), so expanded blocks and the new head are
    always described correctly.
    """
    out = Path(out)
    check_destination(out, overwrite=overwrite)  # again: a file may have appeared while the model was merged
    spec = timm_spec(model)
    sidecar = {**spec, "strategy": strategy_name}
    metadata = {"timm_model": spec["name"], "timm_kwargs": json.dumps(spec["kwargs"]),
                "timm_pretrained_cfg": json.dumps(spec["pretrained_cfg"]), "strategy": strategy_name}
    try:
        atomic_write_safetensors(out, model.state_dict(), metadata=metadata)
        atomic_write_json(out.with_suffix(".json"), sidecar)
    except OSError as e:  # the disk filled up, or the folder changed since the check
        raise UserError(f"--merged {out}: cannot write it ({e.strerror or e})") from None
    return sidecar


def check_destination(out: Path, run_dir: Path | None = None, overwrite: bool = False,
                      keep: tuple[Path, ...] = ()) -> None:
    """Refuse, before the model is built, a --merged path that cannot or may not be written. For OUT
    and the OUT.json beside it: a file of the run in `run_dir` (`RUN_FILES`, or under `RUN_FOLDERS`)
    or in `keep` (its base weights) is refused always; an existing file unless `overwrite`."""
    if out.suffix != ".safetensors":
        raise UserError(f"--merged must name a .safetensors file, got {out}")
    problem = folder_problem(out.parent)
    if problem:
        raise UserError(f"--merged {out}: {problem}")
    for path in (out, out.with_suffix(".json")):
        beside = "" if path == out else " (written beside it)"
        if path.is_dir():
            raise UserError(f"--merged {out}: {path}{beside} is a folder")
        owned = _owned_by_run(path, run_dir, keep)
        if owned:
            raise UserError(f"--merged {out}: {path}{beside} is {owned}")
        if path.exists() and not overwrite:
            raise UserError(f"--merged {out}: {path}{beside} already exists; pass --overwrite to replace it, "
                            f"or pick another name")


def _owned_by_run(path: Path, run_dir: Path | None, keep: tuple[Path, ...]) -> str | None:
    """What `path` is to the run and what to do instead (for the refusal), or None when the run does not own it."""
    path = path.resolve()  # through symbolic links and `..`, as the write would go
    if any(path == k.resolve() for k in keep):
        return "the run's base weights (model.weights), which an export never replaces; pick another name"
    if run_dir is None or not path.is_relative_to(run_dir.resolve()):
        return None
    inside = path.relative_to(run_dir.resolve()).parts
    what = (f"inside the run's own {inside[0]}/" if inside[0] in RUN_FOLDERS else
            f"the run's own {inside[0]}" if len(inside) == 1 and inside[0] in RUN_FILES else None)
    return what and f"{what}, which an export never replaces; write it outside the run folder or under another name"


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | None = None, overwrite: bool = False) -> dict:
    """Export the run folder's adapter (the finished run's `adapter/`, or `checkpoints/<checkpoint>`)
    merged into its base model; return the sidecar. An existing OUT or OUT.json is replaced only
    with `overwrite`, and never a file of the run (`check_destination`)."""
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{run_dir} is not a run folder: it has no config.yaml (written by python -m engine.run)")
    live = holder(run_dir)
    if live is not None:  # a run (a --resume, an --overwrite) writing the adapter and checkpoints as they are read
        raise UserError(f"run folder {run_dir} is in use by {live}: export it once that run has ended")
    cfg = build_config(config)
    check_destination(out, run_dir, overwrite, keep=(Path(cfg.model.weights),) if cfg.model.weights else ())
    adapter_dir = run_dir / "adapter" if checkpoint is None else run_dir / "checkpoints" / checkpoint
    if not (adapter_dir / CONFIG).is_file():
        raise UserError(_no_adapter(run_dir, checkpoint))
    model, strategy = restore_model(cfg, adapter_dir)
    return write_merged(strategy.finalize(model).eval(), out, strategy.name, overwrite)


def _no_adapter(run_dir: Path, checkpoint: str | None) -> str:
    """Which of the run's checkpoints exist (with their step), for the error that finds no adapter."""
    found = []
    for tag in CHECKPOINTS:
        info = run_dir / "checkpoints" / tag / "trainer.json"
        if (run_dir / "checkpoints" / tag / CONFIG).is_file() and info.is_file():
            found.append(f"--checkpoint {tag} (step {json.loads(info.read_text())['step']})")
    missing = (f"{run_dir} has no adapter (adapter/{CONFIG}): the run did not finish" if checkpoint is None
               else f"{run_dir} has no checkpoints/{checkpoint}")
    if not found:
        return f"{missing}, and it wrote no checkpoint (it stopped before its first evaluation)"
    return f"{missing}; export one of its checkpoints instead: {' or '.join(found)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (runs/<name>) holding config.yaml and adapter/")
    p.add_argument("--merged", metavar="OUT.safetensors", required=True,
                   help="where to write the merged timm state dict (OUT.json is written beside it)")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default=None,
                   help="export checkpoints/best or checkpoints/last (a run that did not finish) instead of "
                        "the finished run's adapter/ (default)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT.safetensors and OUT.json (never a file of the run itself)")
    args = p.parse_args(argv)
    try:
        spec = export_run(args.run_dir, args.merged, args.checkpoint, args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.merged} ({spec['strategy']} merged): timm.create_model({spec['name']!r}, pretrained=False, "
          f"pretrained_cfg_overlay=spec['pretrained_cfg'], **spec['kwargs']) with spec = "
          f"{Path(args.merged).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
