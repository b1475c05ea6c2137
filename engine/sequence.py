"""`python -m engine.sequence`: fine-tune on a sequence of targets, one stage after another, and measure what each stage forgot.

    python -m engine.sequence --targets digits,digits-rot90,digits-inverted --strategy lora --adapters swap
    python -m engine.sequence --preset embedded      # full, LoRA (merge, swap), selective LoRA (swap)

Each stage is an ordinary `engine.run` run folder inside the sequence folder (`OUT/NAME/<t>-<target>`),
so its resume, checkpoints and report are a run's; any `engine.run` option given here goes to every
stage. Stage t trains a new head for target t (task-incremental: one head per target, all kept) from
the model after stage t-1, in one of two ways (`--adapters`):

- `merge`: after stage t its adapter is merged into the backbone (`engine.export`, into
  `merged/<t>-<target>.safetensors`) and stage t+1 trains a new one on those weights
  (`--weights`): forgetting accumulates. Block expansion's merged copies are ordinary blocks, so
  each of its stages starts from a backbone P blocks deeper (`model.depth`) and adds P copies more.
  The only way for `full` and `top_k`, which train the backbone itself. Evaluating target j after
  stage t puts head j on the backbone after stage t.
- `swap` (lora, selective_lora, block_expansion, linear): the backbone is never changed; every stage
  trains from the untouched one, each target keeps its adapter and head, and evaluating target j
  loads adapter j (`engine.models.restore_model`): an earlier target's accuracy cannot change.

After every stage every target seen so far is measured (test top-1 with its own head), giving the
accuracy matrix R[t][j] and its measures (`engine.continual`: average accuracy, backward transfer,
forgetting per task as Avalanche and mammoth define them), and the source k-NN after the stage (the
stage run's `source_knn_after`: in swap mode the untouched backbone with that stage's adapter). The
sequence folder holds `sequence.json` (the record, rewritten atomically after each stage),
`sequence.csv` (a row per stage: the measures, storage per task, inference GFLOPs per task),
`matrix.csv` (a row per stage, a column per target, top-1 %, empty where not yet seen), `matrix.png`
and `source.png`. A preset runs several sequences in one folder, each in a folder of its own
(`<strategy>-<adapters>`), and writes the same files over all of them beside them (`sequence.csv`
with every sequence's rows, `matrix.png` a panel each, `source.png` a line each).

Interrupted sequences continue: run the same command again (or `--resume SEQ_DIR`). A stage whose
evaluation is on record is done; one whose run finished is evaluated; one that stopped is resumed
(`engine.run --resume`) from its last full checkpoint, or started again where it wrote none.
The stages run in this process, one after another, on one device. A sequence folder is held by the
process that runs it (`engine.folder_lock`), as a run folder is: a second one is refused in one line.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import continual, data
from .adapter_files import WEIGHTS, read_adapter_config
from .checkpoint import checkpoint_dirs
from .config import FLAG_KEYS, RunConfig, build_config, parse_run_args
from .errors import UserError
from .evaluate import top1_accuracy
from .folder_lock import FolderLock
from .io import atomic_write_json, atomic_write_text
from .models import build_backbone, check_strategy, restore_model
from .precision import PRECISIONS

ADAPTER_MODES = ("merge", "swap")
MERGE_ONLY = ("full", "top_k")      # they train the backbone: the next stage starts from it
DEEPENING = ("block_expansion",)    # merged, its copies become ordinary blocks: each stage's backbone is deeper
RECORD = "sequence.json"
GROUP_RECORD = "sequences.json"     # a folder of several sequences (a preset)
MERGED = "merged"                   # SEQ_DIR/merged/<stage>.safetensors: the backbone after each stage
HEAD_PREFIXES = ("head.", "fc_norm.")  # a timm ViT's classifier (adapters.base.head_names)
# What the sequence sets in each stage's engine.run arguments; a user cannot pass them through.
_OWNED = {"data.target": "--targets", "name": "--name", "out": "--out", "resume": "--resume",
          "json": "--dry-run", "overwrite": "a new --name"}
SEQUENCE_CSV = ("strategy", "adapters", "stage", "target", "run", "target_top1", "average_accuracy",
                "backward_transfer", "mean_forgetting", "source_knn", "source_forgetting", "task_bytes",
                "shared_bytes", "infer_gflops_per_img", "trainable_params", "wall_s")


@dataclass(frozen=True)
class SequencePreset:
    description: str
    targets: tuple[str, ...]
    sequences: tuple[tuple[str, str], ...]   # (strategy, adapters), each a sequence of its own
    run_args: tuple[str, ...] = ()           # every stage's engine.run arguments, before the user's


PRESETS = {
    "embedded": SequencePreset(
        "full (merge), LoRA (merge and swap) and selective LoRA (swap) over digits -> digits-rot90 -> "
        "digits-inverted on the embedded ViT (offline, CPU)",
        targets=("digits", "digits-rot90", "digits-inverted"),
        sequences=(("full", "merge"), ("lora", "merge"), ("lora", "swap"), ("selective_lora", "swap")),
        # no forgetting curve and no shifted test sets: a sequence reads only each stage's end
        run_args=("eval.knn_curve_limit=0", "eval.shift=none")),
}


@dataclass(frozen=True)
class Sequence:
    """One sequence: a strategy kept one way over targets, with the stages' engine.run arguments."""
    strategy: str
    adapters: str
    targets: tuple[str, ...]
    run_args: tuple[str, ...]
    folder: Path

    @property
    def label(self) -> str:
        return f"{self.strategy} ({self.adapters})"

    def stage_name(self, t: int) -> str:
        return f"{t + 1}-{re.sub(r'[^A-Za-z0-9._-]+', '_', self.targets[t])}"

    def run_dir(self, t: int) -> Path:
        return self.folder / self.stage_name(t)

    def merged(self, t: int) -> Path:
        """The backbone (and head) after stage t, merged: the next stage's --weights in merge mode."""
        return self.folder / MERGED / f"{self.stage_name(t)}.safetensors"

    def stage_args(self, t: int) -> list[str]:
        """Stage t's engine.run arguments when it starts afresh."""
        args = [*self.run_args, "--target", self.targets[t], "--out", str(self.folder), "--name", self.stage_name(t)]
        if self.adapters == "merge" and t > 0:
            args += ["--weights", str(self.merged(t - 1))]
            if self.strategy in DEEPENING:  # the copies of stages 1..t, merged, are blocks of stage t's backbone
                args += [f"model.depth={self.merged_depth(t)}"]
        return args

    def merged_depth(self, t: int) -> int:
        """Blocks of the backbone stage t starts from in merge mode: the architecture's, plus every earlier
        stage's P copies (block expansion adds P blocks per stage)."""
        cfg = parse_run_args(self.run_args, "the stages' arguments")
        with torch.device("meta"):
            base = len(build_backbone(replace(cfg.model, pretrained=False, weights=None)).blocks)
        return base + t * cfg.adapter.blocks

    def identity(self) -> dict:
        return {"strategy": self.strategy, "adapters": self.adapters, "targets": list(self.targets),
                "run_args": list(self.run_args)}

    def argv(self) -> list[str]:
        """This sequence alone as an engine.sequence command line (what `--resume` of its folder runs)."""
        return ["--targets", ",".join(self.targets), "--adapters", self.adapters, "--out", str(self.folder.parent),
                "--name", self.folder.name, *self.run_args]


@dataclass(frozen=True)
class Plan:
    sequences: list[Sequence]
    group: Path | None          # a preset's folder, holding its sequences' folders
    argv: list[str]             # the command line to record (without --dry-run)
    dry_run: bool


# -- planning: everything checked before any work --------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.sequence", description="\n\n".join(__doc__.split("\n\n")[:4]),
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,  # --target is not --targets
        epilog="Any other argument (an engine.run flag or key=value, e.g. --strategy lora --steps 100) goes to "
               "every stage.")
    p.add_argument("--targets", help=f"comma list of the targets in training order, each one of: {data.SPEC_HELP}")
    p.add_argument("--adapters", choices=ADAPTER_MODES, default=None,
                   help="merge: each stage's adapter merged into the backbone before the next (default); swap: "
                        "the backbone never changes, each target keeps its adapter (lora, selective_lora, "
                        "block_expansion, linear)")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--out", default="runs", help="the folder the sequence folder goes in (default: runs)")
    p.add_argument("--name", help="the sequence folder's name (default: sequence-<strategy>-<adapters>, or "
                                  "sequence-<preset>)")
    p.add_argument("--resume", metavar="SEQ_DIR", help="continue the sequence (or preset) in this folder with the "
                                                       "arguments it was started with")
    p.add_argument("--dry-run", action="store_true", help="print each stage's state and command; start nothing")
    return p


def _check_extra(extra: list[str], preset: bool) -> None:
    for item in extra:
        flag = item.split("=", 1)[0]
        key = FLAG_KEYS.get(flag[2:].replace("-", "_")) if item.startswith("--") else flag
        if key in _OWNED:
            raise UserError(f"{flag} is set by the sequence for each stage; use {_OWNED[key]}")
        if preset and key == "strategy":
            raise UserError("--strategy: the preset sets each sequence's strategy; give --targets and --strategy "
                            "instead of --preset for a sequence of your own")


def _targets(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if len(targets) < 2:
        raise UserError(f"--targets needs at least two targets (a sequence), got {text!r}")
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise UserError(f"--targets names {repeated[0]} twice: each target is a task with its own head and column")
    for t in targets:
        data.check_spec(t, "target")
    return targets


def check_sequence(seq: Sequence) -> None:
    """The strategy kept this way, and every stage's arguments as engine.run's parser takes them."""
    if seq.adapters == "swap" and seq.strategy in MERGE_ONLY:
        raise UserError(f"--adapters swap keeps a per-target adapter on an untouched backbone; {seq.strategy} "
                        f"trains the backbone itself, so its sequence is --adapters merge")
    for t in range(len(seq.targets)):
        cfg = parse_run_args(seq.stage_args(t), "the stages' arguments")
        # what only the model can judge (block_expansion's P vs the depth, top_k's K, a LoRA budget),
        # before the first stage starts; a target whose classes are known only from its data: at its start
        num_classes = cfg.model.num_classes or data.num_classes(cfg.data.target, "target")
        if num_classes is not None:
            check_strategy(cfg, num_classes)


def plan(argv: list[str]) -> Plan:
    """The sequences to run and where; UserError for bad input, before anything is written."""
    args, extra = _parser().parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("engine.sequence runs its stages in one process, one after another: start it with python, "
                        "not torchrun")
    if args.resume:
        if extra or args.targets or args.preset or args.adapters or args.name or args.out != "runs":
            raise UserError("--resume SEQ_DIR continues with the arguments the sequence was started with; give "
                            "nothing else (but --dry-run)")
        resumed = plan(_recorded_argv(Path(args.resume)))
        return replace(resumed, dry_run=args.dry_run)
    if (args.preset is None) == (args.targets is None):
        raise UserError("give --targets LIST (with --strategy) or --preset NAME (one of them)")
    _check_extra(extra, preset=args.preset is not None)
    if args.preset:
        preset = PRESETS[args.preset]
        if args.adapters:
            raise UserError("--adapters: the preset sets each sequence's way of keeping adapters")
        group = Path(args.out) / (args.name or f"sequence-{args.preset}")
        seqs = [Sequence(s, mode, preset.targets, (*preset.run_args, "--strategy", s, *extra), group / f"{s}-{mode}")
                for s, mode in preset.sequences]
    else:
        targets = _targets(args.targets)
        strategy = parse_run_args(extra, "the stages' arguments").strategy
        mode = args.adapters or "merge"
        group = None
        seqs = [Sequence(strategy, mode, targets, tuple(extra),
                         Path(args.out) / (args.name or f"sequence-{strategy}-{mode}"))]
    for seq in seqs:
        check_sequence(seq)
        check_record(seq)
    return Plan(seqs, group, [a for a in argv if a != "--dry-run"], args.dry_run)


def sequence_for(targets: tuple[str, ...], adapters: str, run_args: tuple[str, ...], folder: Path) -> Sequence:
    """The sequence `python -m engine.sequence --targets ... --adapters ... RUN_ARGS --out folder.parent
    --name folder.name` runs (a sweep's sequence row), checked as that command checks it; UserError otherwise."""
    if adapters not in ADAPTER_MODES:
        raise UserError(f"--adapters {adapters!r}: choose one of {', '.join(ADAPTER_MODES)}")
    targets = _targets(",".join(targets))
    _check_extra(list(run_args), preset=False)
    seq = Sequence(parse_run_args(run_args, "the stages' arguments").strategy, adapters, targets, tuple(run_args),
                   Path(folder))
    check_sequence(seq)
    return seq


def _recorded_argv(folder: Path) -> list[str]:
    for name in (RECORD, GROUP_RECORD):
        path = folder / name
        if path.is_file():
            return list(json.loads(path.read_text())["argv"])
    raise UserError(f"--resume {folder}: not a sequence folder (no {RECORD} or {GROUP_RECORD})")


def read_record_at(folder: Path) -> dict | None:
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def read_record(seq: Sequence) -> dict | None:
    return read_record_at(seq.folder)


def check_record(seq: Sequence) -> None:
    """A sequence folder that holds another sequence (other strategy, targets or arguments) is refused."""
    record = read_record(seq)
    if record is None:
        return
    theirs = {k: record.get(k) for k in seq.identity()}
    if theirs != seq.identity():
        changed = [f"{k} ({theirs[k]!r} -> {v!r})" for k, v in seq.identity().items() if theirs[k] != v]
        raise UserError(f"sequence folder {seq.folder} holds a sequence with other arguments: {', '.join(changed)}; "
                        f"give another --name or --out, or remove that folder")


# -- running the stages ----------------------------------------------------------------------------------

def stage_state(seq: Sequence, t: int, record: dict) -> str:
    """measured (its row is on record), trained (results.json), partial (a folder without results) or new."""
    if t < len(record["stages"]):
        return "measured"
    run_dir = seq.run_dir(t)
    if (run_dir / "results.json").is_file():
        return "trained"
    return "partial" if run_dir.exists() else "new"


def stage_command(seq: Sequence, t: int, state: str) -> list[str]:
    """engine.run's arguments for stage t in `state`: a fresh start; `--resume` from the last full
    checkpoint of one that stopped; a fresh start over one that stopped before writing any."""
    run_dir = seq.run_dir(t)
    if state == "partial":
        if checkpoint_dirs(run_dir) and (run_dir / "config.yaml").is_file():
            return ["--resume", str(run_dir)]
        return [*seq.stage_args(t), "--overwrite"]
    return seq.stage_args(t)


def run_stage(argv: list[str]) -> int:
    from .run import main
    return main(argv)


def run_sequence(seq: Sequence) -> int:
    """Every stage not yet measured, in order; the record and the files after each. The exit status."""
    record = read_record(seq) or {**seq.identity(), "argv": seq.argv(), "stages": []}
    for t, target in enumerate(seq.targets):
        state = stage_state(seq, t, record)
        if state == "measured":
            continue
        if state != "trained":
            command = stage_command(seq, t, state)
            what = "resuming" if command[0] == "--resume" else "starting"
            print(f"\n== {seq.label}, stage {t + 1}/{len(seq.targets)}: {target} ({what} {seq.run_dir(t)})", flush=True)
            code = run_stage(command)
            if code != 0:
                print(f"error: {seq.label}: stage {t + 1} ({target}) stopped (exit {code}); run the same command "
                      f"again to continue from it", file=sys.stderr, flush=True)
                return code
        if seq.adapters == "merge" and not seq.merged(t).is_file():
            from .export import export_run
            export_run(seq.run_dir(t), seq.merged(t))
        record["stages"].append(measure_stage(seq, t))
        write_sequence(seq, record)
        print(f"{seq.label} after stage {t + 1} ({target}): " + ", ".join(
            f"{seq.targets[j]} {v:.2f}%" for j, v in enumerate(record["stages"][-1]["top1"][: t + 1])) +
            f"; source k-NN {record['stages'][-1]['source_knn']:.2f}%", flush=True)
    return 0


# -- measuring a stage -----------------------------------------------------------------------------------

def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def stage_config(seq: Sequence, t: int) -> RunConfig:
    return build_config(seq.run_dir(t) / "config.yaml")


def finished_model(cfg: RunConfig, adapter_dir: Path, device: torch.device):
    """The stage's fine-tuned model as its run measured it: the adapter restored and finalised (the
    weights' notes, said when the stage ran, are not said again)."""
    with contextlib.redirect_stdout(io.StringIO()):
        model, strategy = restore_model(cfg, adapter_dir)
    return strategy.finalize(model.to(device)).eval()


def head_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """A stage's classifier (head, and fc_norm where the model pools) from its adapter file."""
    from safetensors.torch import load_file
    return {k: v for k, v in load_file(adapter_dir / WEIGHTS).items() if k.startswith(HEAD_PREFIXES)}


def put_head(model, head: dict[str, torch.Tensor]) -> None:
    """Give `model` the classifier `head` (another stage's): its class count, then its weights."""
    model.reset_classifier(int(head["head.weight"].shape[0]))
    params = dict(model.named_parameters())
    missing = sorted(set(head) - set(params))
    if missing:
        raise RuntimeError(f"the model has no parameter {missing[0]} for the stored head")
    device = next(model.parameters()).device
    with torch.no_grad():
        for name, value in head.items():
            params[name].copy_(value.to(device))
    model.eval()


def test_top1(model, cfg: RunConfig, device: torch.device) -> float:
    """Top-1 (%) on the test split of `cfg`'s target, read and preprocessed as its run did, rounded as
    results.json rounds."""
    domain = data.load_domain(cfg.data.target, cfg.data.data_root, cfg.seed, role="target",
                              dtd_partition=cfg.data.dtd_partition)
    loader = data.make_loader(domain.test, data.Preprocess.from_model(model), train=False,
                              batch_size=cfg.eval.batch_size, loader=cfg.data.loader, workers=cfg.data.workers,
                              device=device, dali_resize=cfg.data.dali_resize)
    return round(top1_accuracy(model, loader, device, PRECISIONS[cfg.train.precision], desc=f"test {domain.name}",
                               progress=False), 4)


def measure_row(seq: Sequence, t: int, own_top1: float) -> list[float | None]:
    """Row t of the accuracy matrix: every target j <= t on its test split with its own head; None after.

    R[t][t] is `own_top1`, what stage t's run measured (its results.json's target_top1: the same
    model, head and test split). An earlier target j, in merge mode: the model after stage t with head
    j put on it; in swap mode: stage j's own adapter and head on the untouched backbone (nothing of a
    later stage is involved, so R[t][j] = R[j][j] exactly).
    """
    device = _device()
    row: list[float | None] = [None] * len(seq.targets)
    row[t] = own_top1
    now = finished_model(stage_config(seq, t), seq.run_dir(t) / "adapter", device) \
        if seq.adapters == "merge" and t > 0 else None
    for j in range(t):
        cfg_j = stage_config(seq, j)
        if now is None:
            model = finished_model(cfg_j, seq.run_dir(j) / "adapter", device)
        else:
            model = now
            put_head(model, head_tensors(seq.run_dir(j) / "adapter"))
        row[j] = test_top1(model, cfg_j, device)
    return row


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def task_bytes(seq: Sequence, t: int) -> int:
    """What target t alone needs stored: its adapter and head (swap), or its head (merge: the rest is
    in the one backbone all targets share)."""
    from safetensors.torch import load_file
    adapter_dir = seq.run_dir(t) / "adapter"
    tensors = load_file(adapter_dir / WEIGHTS) if seq.adapters == "swap" else head_tensors(adapter_dir)
    return _bytes(tensors.values())


def shared_bytes(cfg: RunConfig) -> int:
    """The backbone every target shares (without a head), counted on a meta-device model."""
    with torch.device("meta"):
        backbone = build_backbone(replace(cfg.model, pretrained=False, weights=None))
    return _bytes(backbone.state_dict().values())


def measure_stage(seq: Sequence, t: int) -> dict:
    """Stage t's entry in sequence.json: its matrix row, source k-NN, storage and cost."""
    results = json.loads((seq.run_dir(t) / "results.json").read_text())
    read_adapter_config(seq.run_dir(t) / "adapter")  # a clear error where the adapter is missing
    return {"stage": t + 1, "target": seq.targets[t], "run": seq.stage_name(t), "top1": measure_row(seq, t, results["target_top1"]),
            "source_knn_before": results["source_knn_before"], "source_knn": results["source_knn_after"],
            "task_bytes": task_bytes(seq, t), "shared_bytes": shared_bytes(stage_config(seq, t)),
            "infer_gflops_per_img": results["infer_gflops_per_img"],
            "trainable_params": results["trainable_params"], "wall_s": results["wall_s"],
            "merged": str(seq.merged(t).relative_to(seq.folder)) if seq.adapters == "merge" else None}


# -- the files -------------------------------------------------------------------------------------------

def matrix(record: dict) -> list[list[float | None]]:
    """The square accuracy matrix of the stages measured so far (R[t][j], j and t up to the last)."""
    n = len(record["stages"])
    return [stage["top1"][:n] for stage in record["stages"]]


def stage_rows(record: dict) -> list[dict]:
    """sequence.csv's rows: a stage each, its measures over the matrix up to it."""
    full = matrix(record)
    untouched = record["stages"][0]["source_knn_before"]
    rows = []
    for t, stage in enumerate(record["stages"]):
        R = [r[: t + 1] for r in full[: t + 1]]
        rows.append({"strategy": record["strategy"], "adapters": record["adapters"], "stage": stage["stage"],
                     "target": stage["target"], "run": stage["run"], "target_top1": R[t][t],
                     "average_accuracy": continual.average_accuracy(R), "backward_transfer": continual.backward_transfer(R),
                     "mean_forgetting": continual.mean_forgetting(R), "source_knn": stage["source_knn"],
                     "source_forgetting": untouched - stage["source_knn"],
                     **{k: stage[k] for k in ("task_bytes", "shared_bytes", "infer_gflops_per_img",
                                              "trainable_params", "wall_s")}})
    return rows


def _csv(rows: list[dict], columns) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else round(row[k], 4) if isinstance(row[k], float) else row[k]
                         for k in columns})
    return out.getvalue()


def matrix_csv(record: dict) -> str:
    """A row per stage (`stage`: the target just trained), a column per target: top-1 %, empty where unseen."""
    targets = record["targets"]
    rows = [{"stage": s["target"], **dict(zip(targets, s["top1"]))} for s in record["stages"]]
    return _csv(rows, ["stage", *targets])


def source_line(record: dict) -> list[float]:
    """Source k-NN of the untouched backbone, then after each stage."""
    return [record["stages"][0]["source_knn_before"], *(s["source_knn"] for s in record["stages"])]


def write_sequence(seq: Sequence, record: dict) -> None:
    """sequence.json (last: a reader that finds a stage there finds its files), sequence.csv, matrix.csv,
    matrix.png and source.png, for the stages measured so far."""
    from .plots import plot_matrices, plot_stages
    R = matrix(record)
    record["matrix"] = R
    record["summary"] = continual.summary(R)
    record["source_knn_untouched"] = record["stages"][0]["source_knn_before"]
    record["complete"] = len(record["stages"]) == len(seq.targets)
    folder = seq.folder
    atomic_write_text(folder / "sequence.csv", _csv(stage_rows(record), SEQUENCE_CSV))
    atomic_write_text(folder / "matrix.csv", matrix_csv(record))
    panels = {seq.label: ([s["top1"] for s in record["stages"]], list(seq.targets))}
    plot_matrices(panels, folder / "matrix.png", f"accuracy matrix: {seq.label}")
    plot_stages({seq.label: source_line(record)}, _stage_labels(seq.targets[: len(record["stages"])]),
                folder / "source.png", f"source k-NN after each stage: {seq.label}")
    atomic_write_json(folder / RECORD, record)


def _stage_labels(targets) -> list[str]:
    return ["untouched", *(f"{t + 1}: {name}" for t, name in enumerate(targets))]


def write_group(group: Path, seqs: list[Sequence], argv: list[str]) -> None:
    """A preset's folder: sequences.json, and sequence.csv, matrix.png and source.png over its sequences."""
    from .plots import plot_matrices, plot_stages
    records = [(seq, r) for seq in seqs if (r := read_record(seq)) and r["stages"]]
    atomic_write_json(group / GROUP_RECORD, {"argv": argv, "sequences": [s.folder.name for s in seqs]})
    if not records:
        return
    rows = [row for _, r in records for row in stage_rows(r)]
    atomic_write_text(group / "sequence.csv", _csv(rows, SEQUENCE_CSV))
    plot_matrices({seq.label: ([s["top1"] for s in r["stages"]], list(seq.targets)) for seq, r in records},
                  group / "matrix.png", f"accuracy matrices: {group.name}")
    longest = max(seqs, key=lambda s: len(s.targets)).targets
    plot_stages({seq.label: source_line(r) for seq, r in records}, _stage_labels(longest), group / "source.png",
                f"source k-NN after each stage: {group.name}")


def format_summary(seq: Sequence) -> str:
    """The matrix and its measures, for the screen."""
    record = read_record(seq)
    if not record or not record["stages"]:
        return f"{seq.label}: no stage measured"
    width = max(len(t) for t in seq.targets) + 2
    lines = [f"{seq.label}: {seq.folder}", "after stage".ljust(width) + "".join(t.rjust(width) for t in seq.targets)
             + "source k-NN".rjust(14)]
    for s in record["stages"]:
        cells = "".join(("" if v is None else f"{v:.2f}").rjust(width) for v in s["top1"])
        lines.append(s["target"].ljust(width) + cells + f"{s['source_knn']:.2f}".rjust(14))
    summary = record["summary"]
    bwt, forgot = summary["backward_transfer"], summary["mean_forgetting"]
    lines.append(f"average accuracy {summary['average_accuracy']:.2f}%, backward transfer "
                 f"{'n/a' if bwt is None else format(bwt, '+.2f')} points, mean forgetting "
                 f"{'n/a' if forgot is None else format(forgot, '.2f')} points; source k-NN "
                 f"{record['source_knn_untouched']:.2f}% untouched, {record['stages'][-1]['source_knn']:.2f}% now")
    return "\n".join(lines)


def sweep_results(folder: Path) -> tuple[dict, float] | None:
    """A finished sequence as a sweep's table reads a run (None while it is not complete): results.json's
    measures, with target_top1 the average accuracy after the last stage, source k-NN before (the
    untouched backbone) and after (the last stage), their forgetting and mean, trainable parameters per
    stage, wall_s summed; then the sequence's own measures (average_accuracy, backward_transfer,
    mean_forgetting). And the validation top-1 that picks its learning rate: the mean over the stages
    of each run's best_val_top1 (source_knn.json)."""
    record = read_record_at(folder)
    if not record or not record.get("complete"):
        return None
    stages, summary = record["stages"], record["summary"]
    before, after, average = record["source_knn_untouched"], stages[-1]["source_knn"], summary["average_accuracy"]
    results = {"strategy": record["strategy"], "adapters": record["adapters"], "targets": record["targets"],
               "target_top1": average, "source_knn_before": before, "source_knn_after": after,
               "forgetting": before - after, "mean": (average + after) / 2,
               "trainable_params": stages[-1]["trainable_params"], "wall_s": sum(s["wall_s"] for s in stages),
               **{k: summary[k] for k in ("average_accuracy", "backward_transfer", "mean_forgetting")}}
    val = [json.loads((folder / s["run"] / "source_knn.json").read_text())["best_val_top1"] for s in stages]
    return results, sum(val) / len(val)


# -- the command -----------------------------------------------------------------------------------------

def dry_run(seqs: list[Sequence]) -> int:
    for seq in seqs:
        record = read_record(seq) or {"stages": []}
        for t, target in enumerate(seq.targets):
            state = stage_state(seq, t, record)
            shown = "" if state in ("measured", "trained") else \
                f": python -m engine.run {shlex.join(stage_command(seq, t, state))}"
            print(f"[{state}] {seq.label} stage {t + 1} {target}{shown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        p = plan(argv)
        seqs, group = p.sequences, p.group
        if p.dry_run:
            return dry_run(seqs)
        began = time.perf_counter()
        with contextlib.ExitStack() as held:
            if group is not None:
                group.mkdir(parents=True, exist_ok=True)
                held.enter_context(FolderLock.take(group, "sequence folder"))
            for seq in seqs:
                seq.folder.mkdir(parents=True, exist_ok=True)
                with FolderLock.take(seq.folder, "sequence folder"):  # one live process writes a sequence
                    code = run_sequence(seq)
                if group is not None:
                    write_group(group, seqs, p.argv)
                if code != 0:
                    return code
        print()
        for seq in seqs:
            print(format_summary(seq) + "\n")
        print(f"sequence{'s' if len(seqs) > 1 else ''} done in {time.perf_counter() - began:.0f} s: "
              f"{group or seqs[0].folder}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
