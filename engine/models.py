"""Building models: the backbone (a timm ViT by name with hub, local-file or embedded weights), the
backbone with a strategy applied, and a run's fine-tuned model restored from its adapter.

Wherever a model is built or restored, the run's kernels backend (`train.kernels`, a runtime
choice that adapter files do not record) is applied to its LoRA modules here.

A CLIP checkpoint (OpenAI's TorchScript release, open_clip's files: image and text tower in one
file) loads its image tower, converted to timm's names by `engine.clip_weights`.

The feature the engine measures forgetting with is timm's pre-logits output: the CLS token after
the final norm (`forward_head(forward_features(x), pre_logits=True)`).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from torch import nn

import adapters

from . import clip_weights
from .adapter_files import load_adapter
from .errors import UserError

EMBEDDED = "embedded"
# The networks a DINO-style training checkpoint holds (`dino_vitbase16_full_checkpoint.pth`: teacher and
# student, with `backbone.` / `module.backbone.` prefixes and a projection head); DINO evaluates the teacher.
WEIGHTS_ENTRIES = ("teacher", "student")
_WRAPPERS = ("model", "state_dict", "module")  # other checkpoints' wrappers around a state dict


def build_backbone(cfg) -> nn.Module:
    """A headless timm ViT (num_classes 0) with the weights `cfg` names; the strategy adds the head."""
    if cfg.name == EMBEDDED:
        from .embedded import create_embedded_vit
        model = create_embedded_vit(pretrained=cfg.pretrained and cfg.weights is None, num_classes=0,
                                    depth=cfg.depth)
        if cfg.weights:
            _say(load_weights(model, cfg.weights, cfg.weights_entry))
        return model
    return _timm_backbone(cfg)


def _timm_backbone(cfg) -> nn.Module:
    import timm

    if not timm.is_model(cfg.name):
        raise UserError(f"unknown model {cfg.name!r}; give a timm ViT name, e.g. vit_base_patch16_224.dino, "
                        f"or 'embedded'")
    shape = {} if cfg.depth is None else {"depth": cfg.depth}
    if cfg.weights:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **shape)
        _say(load_weights(model, cfg.weights, cfg.weights_entry))
        return model
    if shape and cfg.pretrained:
        raise UserError(f"model.depth={cfg.depth}: hub weights have the architecture's depth; give the deeper "
                        f"backbone's file with --weights")
    try:
        return timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=0, **shape)
    except Exception as e:  # hub unreachable, no such weights tag, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not get pretrained weights for {cfg.name} ({first}); offline? "
                        f"download them elsewhere and pass --weights PATH (.pth or .safetensors)") from None


def read_state_dict(path: str | Path, entry: str = "teacher") -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict in a .safetensors or torch pickle (.pth/.pt/.bin) file, and which network of a
    training checkpoint it is (None for a plain state dict).

    A file with `teacher` and `student` entries (DINO's full checkpoint) gives `entry`; a `model`,
    `state_dict` or `module` wrapper is opened.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), None
        except Exception as e:  # truncated, or not safetensors at all
            raise UserError(f"cannot read weights file {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if clip_weights.is_torchscript(path):  # OpenAI's CLIP release
        try:
            return clip_weights.read_torchscript(path), None
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else repr(e)
            raise UserError(f"cannot read the TorchScript archive {path}: {first}") from None
    try:
        import argparse
        with warnings.catch_warnings():  # the unpickler's protocol notes are not the user's business
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals([argparse.Namespace]):  # DINO's checkpoints keep their `args`
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # garbage, or a pickle of more than tensors: torch's message advises unsafe loading
        raise UserError(f"{path} is not a weights file: torch.load reads no state dict of tensors from it; "
                        f"give a torch.save(model.state_dict()) file or a .safetensors file") from None
    chosen = None
    if isinstance(state, dict) and any(isinstance(state.get(e), dict) for e in WEIGHTS_ENTRIES):
        if not isinstance(state.get(entry), dict):
            held = [e for e in WEIGHTS_ENTRIES if isinstance(state.get(e), dict)]
            raise UserError(f"weights file {path.name} holds no {entry!r} network (it holds {', '.join(held)}); "
                            f"set model.weights_entry to one of those")
        state, chosen = state[entry], entry
    for key in _WRAPPERS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state dict")
    return state, chosen


def read_weights(path: str | Path, entry: str = "teacher") -> tuple[dict[str, torch.Tensor], str | None]:
    """`read_state_dict` with the wrappers' key prefixes (`module.`, `backbone.`, `_orig_mod.`) stripped."""
    raw, chosen = read_state_dict(path, entry)
    return {_strip_prefix(k): v for k, v in raw.items()}, chosen


def load_weights(model: nn.Module, path: str | Path, entry: str = "teacher") -> str | None:
    """Load a local checkpoint into a headless backbone; a clear error when it does not fit.

    Prefixes (`module.`, `backbone.`, `_orig_mod.`) are stripped and `head.*` is dropped (a classifier,
    or DINO's projection head): the strategy adds a new head. Returns a note saying which network of a
    training checkpoint was loaded and which keys were dropped (None when nothing was).
    """
    state, chosen = read_weights(path, entry)
    clip = clip_weights.is_clip_state(state)
    if clip:  # image and text tower in OpenAI's layout: the image tower in timm's names, its projection as head.*
        state = clip_weights.image_tower(state, model)
    dropped = [] if clip else sorted(k for k in state if k.startswith("head."))
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape]
    name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys of the wrong shape, e.g. {wrong_shape[0]}")
    if problems:
        raise UserError(f"weights file {Path(path).name} does not fit {name}: {'; '.join(problems)}")
    model.load_state_dict(state)
    openai = clip and clip_weights.is_torchscript(Path(path)) and not clip_weights.uses_quick_gelu(name)
    return _weights_note(Path(path).name, chosen, dropped, clip, openai and name)


def _weights_note(file: str, chosen: str | None, dropped: list[str], clip: bool = False,
                  gelu_for_openai: str | None = None) -> str | None:
    parts = [f"the {chosen} network of a training checkpoint"] if chosen else []
    if clip:
        parts.append("the image tower of a CLIP checkpoint (its projection visual.proj is kept for zero-shot; "
                     "the strategy adds a new head)")
    if gelu_for_openai:
        parts.append(f"{gelu_for_openai} uses GELU, but OpenAI's CLIP was trained with QuickGELU: timm's "
                     f"{gelu_for_openai.replace('_clip_', '_clip_quickgelu_')} computes the released model")
    if dropped:
        shown = ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        parts.append(f"dropped {len(dropped)} head keys ({shown}): the strategy adds a new head")
    return f"weights {file}: {'; '.join(parts)}" if parts else None


def _say(note: str | None) -> None:
    if note:
        print(f"note: {note}")


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "backbone.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def timm_spec(model: nn.Module) -> dict:
    """What timm alone needs to rebuild this model and preprocess its input as the engine did:
    `timm.create_model(name, pretrained=False, pretrained_cfg_overlay=pretrained_cfg, **kwargs)`,
    after which `timm.data.resolve_model_data_config` gives back `pretrained_cfg`.

    `name` keeps the pretrained tag (`vit_small_patch16_224.dino`: its mean and std are ImageNet's,
    the bare architecture's are 0.5); `pretrained_cfg` is the model's data config (input size,
    interpolation, mean, std, crop_pct, crop_mode), which also covers the embedded ViT's 32 px.
    """
    from timm.data import resolve_model_data_config

    from .embedded import EMBEDDED_VIT

    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in resolve_model_data_config(model).items()}
    cfg = model.pretrained_cfg
    if cfg.get("architecture") == EMBEDDED:
        name, kwargs = "vit_tiny_patch16_224", dict(EMBEDDED_VIT)
    else:
        name, kwargs = cfg["architecture"] + (f".{cfg['tag']}" if cfg.get("tag") else ""), {}
    kwargs.update(depth=len(model.blocks), num_classes=model.num_classes)
    return {"name": name, "kwargs": kwargs, "pretrained_cfg": data_config}


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone feature: CLS (or pooled) token after the final norm, before any head. (B, D)"""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def apply_strategy(strategy, backbone: nn.Module, num_classes: int, kernels: str) -> nn.Module:
    """`strategy` applied to `backbone` (in place), its LoRA modules on the kernels backend `kernels`."""
    return adapters.use_kernels(strategy.apply(backbone, num_classes), kernels)


def check_strategy(cfg, num_classes: int):
    """Build the run's model on the meta device (no memory, no weights, no RNG drawn) to check the
    options that only the model can judge (top_k vs depth, a budget vs the LoRA blocks); returns
    that meta model. UserError naming the problem."""
    with torch.device("meta"):
        backbone = build_backbone(dataclasses.replace(cfg.model, pretrained=False, weights=None))
    try:
        model = adapters.get_strategy(cfg.strategy, cfg.adapter).apply(backbone, num_classes)
    except adapters.AdapterError as e:
        raise UserError(f"{cfg.strategy}: {e}") from None
    return model


def restore_model(cfg, adapter_dir: str | Path) -> tuple[nn.Module, object]:
    """The run's base backbone rebuilt as the run built it (its seed first, so a random init repeats),
    with the adapter at `adapter_dir` loaded onto it, on the run's kernels; returns (model, strategy)."""
    torch.manual_seed(cfg.seed)
    model, strategy = load_adapter(build_backbone(cfg.model), adapter_dir)
    return adapters.use_kernels(model, cfg.train.kernels), strategy
