"""Typed run configuration: defaults here, then YAML (`--config`), then flags, then `key=value`.

Every default lives in these dataclasses (the adapter section's in `adapters.AdapterConfig`) and
nowhere else; every choice list is read from the module that owns it (strategies from
`adapters.STRATEGIES`, kernel backends from `kernels.BACKENDS`, loaders, resamplers, data sets,
optimisers, schedules, precisions and ZeRO stages from their engine modules); every CLI flag is
declared once, in `FLAGS`, and the parser and the flag-to-key map are built from it. Defaults are
tuned for the embedded default run (a small ViT, digits as the target) so that `python -m
engine.run` finishes in minutes on two CPU cores; `configs/paper_cifar100.yaml` holds the paper's recipe.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import io
import math
import re
import shlex
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

import kernels
from adapters import STRATEGIES, AdapterConfig, AdapterError

from .curve import parse_steps
from .data import LOADERS, SPEC_HELP, check_spec
from .data.bad_images import MAX_IMAGE_PIXELS
from .data.dali_loader import RESIZERS
from .distributed import ZERO_STAGES
from .dotted import flatten
from .errors import UserError
from .models import WEIGHTS_ENTRIES
from .optim import LR_SCALES, OPTIMIZERS, SCHEDULES, resolved_lr
from .precision import PRECISIONS
from .shift import check_specs as check_shift_specs
from .zeroshot import HEAD_INITS
from .zeroshot import check_config as check_zeroshot


@dataclass
class ModelConfig:
    name: str = "embedded"            # "embedded" or any timm ViT name, e.g. vit_base_patch16_224.dino
    weights: str | None = None        # local .pth / .safetensors; None = embedded checkpoint or hub weights
    weights_entry: str = "teacher"    # which network of a DINO-style training checkpoint: teacher | student
    pretrained: bool = True           # False: random init (tests, dry runs)
    num_classes: int | None = None    # None = number of target classes
    depth: int | None = None          # blocks of the backbone; None = the architecture's (a merged block
    #                                   expansion's backbone is deeper: engine.sequence --adapters merge)
    head_init: str = "new"            # new | zeroshot (CLIP: the head starts from the target's class-name text
    #                                   embeddings, engine.zeroshot)


@dataclass
class DataConfig:
    target: str = "embedded"          # embedded | digits | cifar10 | cifar100 | dtd | flowers102 | food101 |
    #                                   imagefolder:DIR (engine.data.DATASETS)
    source: str = "embedded"          # domain of pre-training, measured by k-NN for forgetting
    data_root: str = "data"
    val_fraction: float = 0.1         # held out of the target train split for checkpoint selection (a target
    #                                   with an official val split, DTD and Flowers102, selects on that instead)
    dtd_partition: int = 1            # DTD's official train/val/test partition, 1..10
    loader: str = "auto"              # auto | dali | torch
    dali_resize: str = "auto"         # DALI's image-file resampler: auto (torch's on CPU, DALI's on GPU) | dali | torch
    workers: int = 2
    # Training augmentation; None = the target's own choice: 0.08 and 0.5 (the paper's recipe) for
    # natural images, 0.35 and 0 (no flip) for digits.
    crop_scale_min: float | None = None  # random-resized crop keeps crop_scale_min..100% of the area
    hflip: float | None = None           # horizontal-flip probability in training
    knn_train_limit: int | None = None  # cap on the k-NN bank (source train); None = all
    knn_test_limit: int | None = None   # cap on the k-NN queries (source test); None = all
    max_bad_images: int = 100         # unreadable images skipped (and named) before the run stops with the list
    max_image_pixels: int | None = MAX_IMAGE_PIXELS  # PIL's limit: above it read with a note, above twice it
    #                                   skipped as unreadable (engine.data.bad_images); None or 0 = no limit


@dataclass
class TrainConfig:
    steps: int = 150
    eval_every: int = 50
    lr: float = 0.05                  # the peak LR at base_batch images (all of them when lr_scale is none)
    batch_size: int = 32
    lr_scale: str = "none"            # none | linear | sqrt: how the LR follows batch_size / base_batch
    base_batch: int = 256             # the batch `lr` is meant for when it is scaled (DINO's 256)
    lr_resolved: float | None = None  # derived (resolved_for_target): lr after lr_scale, on record in config.yaml
    optimizer: str = "sgd"            # any of timm's optimiser names; sgd = classical momentum (engine.optim)
    momentum: float = 0.9
    weight_decay: float = 0.0         # never on biases, norms, gate scores, position embedding, class token
    layer_decay: float | None = None  # layer-wise LR decay (BEiT): blocks.i of N at decay^(N - i) of the LR, head 1
    schedule: str = "cosine"          # cosine | constant  (both after a linear warm-up)
    warmup_steps: int = 15
    warmup_fraction: float | None = None  # warm-up as a fraction of the steps; overrides warmup_steps when set
    grad_checkpointing: bool = False  # recompute each block's forward in backward (timm's set_grad_checkpointing)
    grad_accum: int = 1
    zero_stage: int = 2               # ZeRO-2: optimiser state + gradients sharded; frozen weights left alone
                                      # (one process runs 1 and 2 as stage 0: engine.distributed.zero_stage_run)
    precision: str = "fp32"           # fp32 | bf16 (autocast) | fp16 (autocast, CUDA only)
    grad_clip: float | None = 1.0     # max gradient norm; none turns clipping off (1.0: DeepSpeed's own default,
                                      # which every run had before it was stated here)
    label_smoothing: float = 0.0
    checkpoint_every: int | None = None  # a full checkpoint (for --resume) every N steps; None = at every eval
    keep_checkpoints: int = 1         # full checkpoints kept (the newest); checkpoints/best stays in adapter form
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged over ours (theirs wins)
    log_every: int = 10               # a metrics.csv row (training loss, lr, throughput) every N steps, and at evals
    max_skipped_steps: int = 0        # steps DeepSpeed may skip for non-finite gradients before the run stops
                                      # (ZeRO 1-3; under stage 0 nothing skips: they stop the run)
    kernels: str = "auto"             # the fused LoRA op's backend: auto | triton | torch | reference
    cache_features: bool | None = None  # linear probing over features computed once (engine.feature_cache);
                                        # None = on for linear with augmentation off
    compile: bool = False             # the training forward under torch.compile (inductor); evaluation stays eager


@dataclass
class EvalConfig:
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_report_k: int = 20            # the k whose accuracy goes into results.json
    knn_temperature: float = 0.07
    knn_crop_pct: float | None = None   # k-NN images: resize to input / crop_pct, centre crop; None = the model's
                                        # (timm's DINO ViT-B says 0.9; DINO's eval_knn resizes 256 for 224: 0.875)
    batch_size: int = 256
    # The forgetting curve (engine.curve): source k-NN during training, in metrics.csv's source_knn.
    knn_steps: list[str] | None = None  # steps it is measured at, each N, A-B (every step) or log (engine.curve.
    #                                     parse_steps); None = log: 0, 1, 2, 5, 10, 20, 50, ... and the last
    knn_curve_limit: int = 200          # bank images and query images (each) it extracts per step; 0 = no curve
    source_cache: bool = True           # the untouched backbone's source features kept in OUT/source_features
    #                                     for the next run (engine.source_features); false: extract, write nothing
    throughput_iters: int = 5           # timed forward passes of a 64-image batch for infer_img_per_s; 0 = not
                                        # measured (null in results.json: runs that only need the accuracies)
    # Accuracy under distribution shift (engine.shift): shifted test sets of the target's classes.
    shift: list[str] | None = field(default_factory=lambda: ["auto"])  # corrupt:NAME@S, imagefolder:DIR; auto =
    #                                   the target's own (digits: corrupt:all@3, others none); none = off
    # CLIP's zero-shot accuracy before and after fine-tuning (engine.zeroshot): data sets by registry name.
    zeroshot: list[str] | None = None   # e.g. cifar10,imagefolder:DIR; None = not measured
    zeroshot_templates: str | None = None  # prompt templates file, one a line with {}; None = CLIP's 80 ImageNet ones


@dataclass
class RunConfig:
    strategy: str = "selective_lora"
    name: str | None = None           # run folder name; None = <strategy>-<timestamp>
    out: str = "runs"
    seed: int = 0
    overwrite: bool = False           # an existing run folder of the same --name is replaced
    verbose: bool = False             # DeepSpeed's own log lines too
    dry_run: bool = False
    world_size: int | None = None     # --dry-run: the processes whose start it checks; None = the launcher's
    #                                   WORLD_SIZE, else 1 (a run's world is always its launcher's)
    json: bool = False
    resume: str | None = None         # a run folder to continue from its last full checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


# The CLI: every flag once, with the dotted key it sets and its help. The type, the default and the
# choices shown in --help come from the dataclasses and the owners' registries.
FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--strategy", "strategy", "fine-tuning strategy"),
    ("--model", "model.name", "'embedded' or a timm ViT name, e.g. vit_base_patch16_224.dino"),
    ("--weights", "model.weights", "local .pth / .safetensors backbone weights (default: the embedded "
                                   "checkpoint, or timm's hub weights when online)"),
    ("--weights-entry", "model.weights_entry", "the network to load from a training checkpoint holding "
                                               "teacher and student entries (DINO's full checkpoint)"),
    ("--num-classes", "model.num_classes", "classes of the new head (default: the target's)"),
    ("--target", "data.target", f"the domain to adapt to: {SPEC_HELP}"),
    ("--source", "data.source", f"the pre-training domain whose k-NN accuracy measures forgetting: {SPEC_HELP}"),
    ("--data-root", "data.data_root", "folder holding cifar-10-batches-py, cifar-100-python, dtd, flowers-102, "
                                      "food-101"),
    ("--loader", "data.loader", "data loader (auto: DALI where it is installed and runs, else torch)"),
    ("--steps", "train.steps", "optimiser steps"),
    ("--eval-every", "train.eval_every", "validate (and maybe keep the best checkpoint) every N steps"),
    ("--lr", "train.lr", "peak learning rate, reached after the warm-up (at train.base_batch with --lr-scale)"),
    ("--batch-size", "train.batch_size", "global batch: micro-batch x grad accumulation x ranks"),
    ("--grad-accum", "train.grad_accum", "gradient accumulation steps per optimiser step"),
    ("--optimizer", "train.optimizer", "timm optimiser over the trainable parameters (sgd: classical momentum)"),
    ("--lr-scale", "train.lr_scale", "scale --lr from train.base_batch to the global batch (linear: DINO's rule)"),
    ("--layer-decay", "train.layer_decay", "layer-wise LR decay, e.g. 0.65 (strategies that train backbone blocks)"),
    ("--grad-checkpointing", "train.grad_checkpointing", "recompute activations in backward: less memory, more time"),
    ("--precision", "train.precision", "fp32, or autocast to bf16 (CPU or GPU) or fp16 (CUDA only)"),
    ("--zero-stage", "train.zero_stage", "DeepSpeed ZeRO stage"),
    ("--checkpoint-every", "train.checkpoint_every", "a full checkpoint for --resume every N steps (default: at "
                                                     "every eval), and on SIGINT / SIGTERM"),
    ("--deepspeed-config", "train.deepspeed_config", "a DeepSpeed JSON merged over the generated one (theirs wins; "
                                                     "contradicted keys are reported)"),
    ("--kernels", "train.kernels", "backend of the fused LoRA op (auto: Triton on CUDA, torch elsewhere)"),
    ("--compile", "train.compile", "run the training forward under torch.compile (inductor); evaluation stays eager"),
    ("--top-k", "adapter.top_k", "top_k: the last K blocks train"),
    ("--lora-rank", "adapter.lora_rank", "LoRA rank r"),
    ("--lora-alpha", "adapter.lora_alpha", "LoRA alpha; scale = alpha / rank (default: the rank, scale 1)"),
    ("--lora-targets", "adapter.lora_targets", "comma list of q,k,v,proj,fc1,fc2"),
    ("--blocks", "adapter.blocks", "block_expansion: number of new blocks P"),
    ("--sparsity-lambda", "adapter.sparsity_lambda", "selective_lora: weight of the sparsity penalty"),
    ("--active-blocks", "adapter.active_blocks", "selective_lora budget: exactly K active LoRA blocks"),
    ("--active-fraction", "adapter.active_fraction", "selective_lora budget: a fraction of the LoRA blocks"),
    ("--knn-steps", "eval.knn_steps", "comma list of steps (N), ranges (A-B) or log at which the forgetting curve "
                                      "measures source k-NN, e.g. 0-10,log (default log: 0,1,2,5,10,20,50,... and "
                                      "the last step)"),
    ("--knn-curve-limit", "eval.knn_curve_limit", "bank and query images (each) of the forgetting curve; 0 = no curve"),
    ("--seed", "seed", "seed of the initialisation, the data order and the augmentation"),
    ("--name", "name", "run folder name under --out (default: <strategy>-<time>)"),
    ("--out", "out", "folder for run folders"),
    ("--overwrite", "overwrite", "replace an existing run folder of the same --name (else it is refused)"),
    ("--verbose", "verbose", "also show DeepSpeed's log lines"),
    ("--resume", "resume", "continue the run in this folder from its last full checkpoint, with its config.yaml "
                           "(flags and key=value may change only what does not change the run)"),
    ("--dry-run", "dry_run", "run the start checks on a meta-device model, print parameters and GFLOPs, exit (no "
                             "data, weights or training)"),
    ("--world-size", "world_size", "with --dry-run: check the batch geometry and ZeRO stage for N processes "
                                   "(default: the launcher's WORLD_SIZE, else 1)"),
    ("--json", "json", "with --dry-run: print one JSON object"),
)
FLAG_KEYS = {flag[2:].replace("-", "_"): key for flag, key, _ in FLAGS}  # argparse dest -> dotted key

# Every choice, read from its owner.
_CHOICES = {
    "strategy": tuple(STRATEGIES),
    "data.loader": LOADERS,
    "data.dali_resize": RESIZERS,
    "train.optimizer": OPTIMIZERS,
    "train.lr_scale": LR_SCALES,
    "train.schedule": SCHEDULES,
    "train.precision": tuple(PRECISIONS),
    "train.zero_stage": ZERO_STAGES,
    "train.kernels": kernels.BACKENDS,
    "model.weights_entry": WEIGHTS_ENTRIES,
    "model.head_init": HEAD_INITS,
}

# Ranges of the numeric keys (the adapter section checks its own: AdapterConfig.check). Every float
# must also be finite.
_POSITIVE = ("positive", lambda v: v > 0)
_NON_NEGATIVE = ("at least 0", lambda v: v >= 0)
_RANGES = {
    "seed": _NON_NEGATIVE,
    "world_size": _POSITIVE,
    "model.num_classes": _POSITIVE,
    "model.depth": _POSITIVE,
    "data.val_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "data.dtd_partition": ("in 1..10 (DTD's official partitions)", lambda v: 1 <= v <= 10),
    "data.workers": _NON_NEGATIVE,
    "data.crop_scale_min": ("in (0, 1]", lambda v: 0 < v <= 1),
    "data.hflip": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "data.knn_train_limit": _POSITIVE,
    "data.knn_test_limit": _POSITIVE,
    "data.max_bad_images": _NON_NEGATIVE,
    "data.max_image_pixels": _NON_NEGATIVE,
    "train.steps": _POSITIVE,
    "train.eval_every": _POSITIVE,
    "train.lr": _POSITIVE,
    "train.batch_size": _POSITIVE,
    "train.grad_accum": _POSITIVE,
    "train.momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "train.weight_decay": _NON_NEGATIVE,
    "train.warmup_steps": _NON_NEGATIVE,
    "train.warmup_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "train.base_batch": _POSITIVE,
    "train.lr_resolved": _POSITIVE,  # derived, but a hand-edited config.yaml may carry one
    "train.layer_decay": ("in (0, 1]", lambda v: 0 < v <= 1),
    "train.grad_clip": _POSITIVE,
    "train.label_smoothing": ("in [0, 1)", lambda v: 0 <= v < 1),
    "train.log_every": _POSITIVE,
    "train.max_skipped_steps": _NON_NEGATIVE,
    "train.checkpoint_every": _POSITIVE,
    "train.keep_checkpoints": _POSITIVE,
    "eval.knn_report_k": _POSITIVE,
    "eval.knn_temperature": _POSITIVE,
    "eval.knn_crop_pct": ("in (0, 1]", lambda v: 0 < v <= 1),
    "eval.batch_size": _POSITIVE,
    "eval.knn_curve_limit": _NON_NEGATIVE,
    "eval.throughput_iters": _NON_NEGATIVE,
}

# Keys that older versions wrote into config.yaml under another name.
_RENAMED = {"adapter.kernels": "train.kernels"}


def _section_types(obj) -> dict[str, typing.Any]:
    return typing.get_type_hints(type(obj))


def _coerce(value, hint, key: str):
    """Turn a YAML or command-line value into the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and hint is not str):
        if type(None) in args:
            return None
        raise UserError(f"config key {key} cannot be empty")
    if type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [_coerce(v, args[0], key) for v in items]
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key {key} expects {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def key_hint(key: str):
    """The declared type of a dotted key (`train.lr` -> float)."""
    *sections, leaf = key.split(".")
    target = RunConfig()
    for part in sections:
        target = getattr(target, part)
    return _section_types(target)[leaf]


def default(key: str):
    """The default value of a dotted key."""
    target = RunConfig()
    for part in key.split("."):
        target = getattr(target, part)
    return target


def set_key(cfg: RunConfig, key: str, value) -> None:
    """Set a dotted key (`train.lr`) with type coercion; unknown keys are a UserError."""
    key = _RENAMED.get(key, key)
    parts = key.split(".")
    target = cfg
    for part in parts[:-1]:
        if not hasattr(target, part) or not dataclasses.is_dataclass(getattr(target, part)):
            raise UserError(f"unknown config key {key!r}; sections are: {', '.join(_sections())}")
        target = getattr(target, part)
    hints = _section_types(target)
    leaf = parts[-1]
    if leaf not in hints or dataclasses.is_dataclass(getattr(target, leaf)):
        known = sorted(f.name for f in fields(target) if not dataclasses.is_dataclass(getattr(target, f.name)))
        raise UserError(f"unknown config key {key!r}; known keys here: {', '.join(known)}")
    setattr(target, leaf, _coerce(value, hints[leaf], key))


def _sections() -> list[str]:
    return [f.name for f in fields(RunConfig) if dataclasses.is_dataclass(getattr(RunConfig(), f.name))]


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"config file {path} cannot be read ({e.strerror or e})") from None
    try:
        tree = yaml.safe_load(data) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {_yaml_problem(e, data)}") from None
    if not isinstance(tree, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, got {type(tree).__name__}")
    return flatten(tree)


def _yaml_problem(e: yaml.YAMLError, data: bytes) -> str:
    """Where (line and column, from 1 as editors count) and what yaml found wrong, in one line."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    if isinstance(e, yaml.reader.ReaderError):  # not text: a byte that does not decode, or a control character
        undecodable = e.encoding != "unicode"  # then yaml's position counts bytes, else characters
        source = data if undecodable else data.decode("utf-8", "replace")
        newline = b"\n" if undecodable else "\n"
        start = source.rfind(newline, 0, e.position) + 1
        where = f"line {source.count(newline, 0, e.position) + 1}, column {e.position - start + 1}"
        what = f"byte 0x{e.character:02x} is not {e.encoding}" if undecodable else f"character #x{e.character:04x}"
        return f"{where}: {what} ({e.reason})"
    if not isinstance(e, yaml.MarkedYAMLError) or (e.problem_mark or e.context_mark) is None:
        return str(e).splitlines()[0]
    if e.problem_mark is None:
        return f"{at(e.context_mark)}: {e.context}"
    within = f" ({e.context} at {at(e.context_mark)})" if e.context and e.context_mark is not None else ""
    return f"{at(e.problem_mark)}: {e.problem}{within}"


def build_config(yaml_path: str | None = None, flags: dict | None = None, overrides: list[str] = (),
                 user_yaml: bool = False) -> RunConfig:
    """Resolve a RunConfig: defaults < YAML file < flags < `key=value` overrides, then validate.

    `flags` maps argparse destinations (`lr`, `batch_size`: see FLAG_KEYS) to values; None = unset.
    `user_yaml`: the YAML is the user's own (`--config`), so its keys count as chosen, as flags and
    key=value always do; a run's saved config.yaml (`--resume`, export) lists every key, chosen or not.
    """
    cfg = RunConfig()
    chosen = set()
    if yaml_path:
        for key, value in load_yaml(yaml_path).items():
            set_key(cfg, key, value)
            if user_yaml:
                chosen.add(key)
    for flag, value in (flags or {}).items():
        if value is not None:
            set_key(cfg, FLAG_KEYS[flag], value)
            chosen.add(FLAG_KEYS[flag])
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value, e.g. train.lr=0.01")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), value.strip())
        chosen.add(key.strip())
    validate(cfg)
    check_warmup(cfg, chosen)
    return cfg


def check_warmup(cfg: RunConfig, chosen: set[str]) -> None:
    """A warm-up the user chose (`chosen`: the keys they set) that is longer than the run is refused;
    one they did not choose (the default, or a saved config's) is cut to the run by
    engine.optim.warmup_steps, and engine.optim.warmup_note says so."""
    train = cfg.train
    if "train.warmup_steps" in chosen and train.warmup_fraction is None and train.warmup_steps > train.steps:
        raise UserError(f"train.warmup_steps {train.warmup_steps} is longer than the run (train.steps "
                        f"{train.steps}); lower it to at most {train.steps}, or give train.warmup_fraction")


def _choice_list(choices, given, most: int = 12) -> str:
    """The choices for an error line; a long list (timm's optimisers) gives the nearest few and --help."""
    names = [str(c) for c in choices]
    if len(names) <= most:
        return ", ".join(names)
    near = difflib.get_close_matches(str(given), names, n=5, cutoff=0.5)
    return f"the {len(names)} names --help lists" + (f" (nearest: {', '.join(near)})" if near else "")


def validate(cfg: RunConfig) -> None:
    """Choice, range and combination checks that a type alone cannot express."""
    flat = flatten(cfg.to_dict())
    if flat["strategy"] not in _CHOICES["strategy"]:
        raise UserError(f"unknown strategy {flat['strategy']!r}; choose one of: {', '.join(_CHOICES['strategy'])}")
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise UserError(f"{key} must be one of {_choice_list(choices, flat[key])}, got {flat[key]!r}")
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
    for key, (what, ok) in _RANGES.items():
        if flat[key] is not None and not ok(flat[key]):
            raise UserError(f"{key} must be {what}, got {flat[key]}")
    try:
        cfg.adapter.check()
    except AdapterError as e:
        raise UserError(f"adapter options: {e}") from None
    check_spec(cfg.data.target, "target")
    check_spec(cfg.data.source, "source")
    check_shift_specs(cfg.eval.shift)
    check_zeroshot(cfg)
    if cfg.dry_run and cfg.resume:
        raise UserError("--dry-run builds a model and exits; it does not take --resume")
    if cfg.world_size is not None and not cfg.dry_run:
        raise UserError("--world-size only works with --dry-run (a run's processes are its launcher's)")
    if cfg.json and not cfg.dry_run:
        raise UserError("--json only works with --dry-run (a training run writes results.json in its run folder)")
    if not cfg.eval.knn_k or min(cfg.eval.knn_k) <= 0:
        raise UserError(f"eval.knn_k must list positive k values, got {cfg.eval.knn_k}")
    if cfg.eval.knn_steps is not None:
        try:
            steps = parse_steps(cfg.eval.knn_steps, cfg.train.steps)
        except ValueError as e:
            raise UserError(f"eval.knn_steps: {e}") from None
        if not all(0 <= s <= cfg.train.steps for s in steps):
            raise UserError(f"eval.knn_steps must lie in 0..train.steps ({cfg.train.steps}), "
                            f"got {','.join(map(str, cfg.eval.knn_steps))}")
    if cfg.eval.knn_report_k not in cfg.eval.knn_k:
        cfg.eval.knn_k = sorted(set(cfg.eval.knn_k) | {cfg.eval.knn_report_k})


def save_yaml(cfg: RunConfig, path: Path) -> None:
    from .io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# -- the command line ---------------------------------------------------------------------------------

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wide enough for the choices."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=28, width=110)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The CLI parser, built from FLAGS: each flag's type, default and choices from its key."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=_HelpFormatter,
        epilog="Any config key can also be set as key=value, e.g. train.warmup_steps=50 adapter.gate_init=0.2. "
               "Precedence: defaults < --config YAML < flags < key=value.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--config", metavar="YAML", help="YAML file of config keys (sections model, data, train, adapter, eval)")
    for flag, key, text in FLAGS:
        hint = key_hint(key)
        if type(None) in typing.get_args(hint):  # Optional[X] -> X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if typing.get_origin(hint) is list:  # a comma list, split by set_key
            hint = str
        extra = f" (choices: {', '.join(map(str, _CHOICES[key]))})" if key in _CHOICES else ""
        if hint is bool:
            p.add_argument(flag, action="store_true", default=None, help=text + extra)
            continue
        shown = "" if default(key) is None else f"default: {default(key)}; "  # None: the help says what it means
        p.add_argument(flag, type=hint, metavar=key.rsplit(".", 1)[-1].upper(), help=f"{text}{extra} ({shown}key {key})")
    return p


def parse_run_args(args, where: str) -> RunConfig:
    """engine.run's config for the run arguments `args` that another command (a sweep, a sequence)
    passes on; a UserError (one line, naming `where` they came from) for anything the parser refuses."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_args(list(args))
    except SystemExit:  # argparse's own refusal (a value of the wrong type): keep its message, drop the usage
        message = stderr.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise UserError(f"{message} (in {where}: {shlex.join(args)})") from None


def parse_args(argv: list[str] | None, prog: str = "python -m engine.run", description: str = "") -> RunConfig:
    """argv -> a validated RunConfig (UserError for bad input). With --resume the run's own
    config.yaml takes --config's place."""
    argv = sys.argv[1:] if argv is None else argv
    # the `deepspeed` launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    argv = [a for a in argv if not re.fullmatch(r"--local[_-]rank=\d+", a)]
    args = build_parser(prog, description).parse_intermixed_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in FLAG_KEYS}
    yaml_path = args.config
    if args.resume:
        if args.config:
            raise UserError("--resume reads the run's own config.yaml: give changes as flags or key=value, not --config")
        yaml_path = resume_yaml(args.resume)
    return build_config(yaml_path, flags, args.overrides, user_yaml=args.config is not None)


def resume_yaml(run_dir: str | Path) -> Path:
    """RUN_DIR/config.yaml, the config of the run `--resume RUN_DIR` continues."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: not a run folder (no config.yaml)")
    return path


def resolved_for_target(cfg: RunConfig, crop_scale_min: float, hflip: float) -> RunConfig:
    """The config with the target's own augmentation filled in where it was left unset (None), and
    the learning rate its lr_scale resolves to (recomputed, whatever a reused config.yaml held)."""
    data = dataclasses.replace(
        cfg.data,
        crop_scale_min=crop_scale_min if cfg.data.crop_scale_min is None else cfg.data.crop_scale_min,
        hflip=hflip if cfg.data.hflip is None else cfg.data.hflip)
    train = dataclasses.replace(cfg.train, lr_resolved=resolved_lr(cfg.train))
    return dataclasses.replace(cfg, data=data, train=train)
