"""Adapters on disk: the trainable weights (safetensors) and the JSON that rebuilds the structure.

    <dir>/adapter.safetensors  the strategy's trainable parameters (`trainable_names`), by state-dict name
    <dir>/adapter.json         {"strategy", "adapter_config", "state", "base"}

The frozen weights are not stored: `load_adapter` takes a fresh base backbone (the same one the run
started from), re-applies the strategy from the JSON, restores its state (block positions, gates) and
loads the tensors, which reproduces the fine-tuned model's logits exactly. The engine uses the same
pair for checkpoints/best and checkpoints/last ('full' saves every parameter).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from adapters import AdapterConfig, AdapterError, get_strategy

from .errors import UserError
from .io import atomic_write_safetensors, atomic_write_text

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter.json"


# Options that older versions wrote into adapter.json and that are no longer adapter options.
_RETIRED_OPTIONS = ("kernels",)  # a runtime choice now: train.kernels


def adapter_tensors(model: nn.Module, strategy) -> dict[str, torch.Tensor]:
    """The tensors an adapter holds: the strategy's declared trainable parameters, by state-dict name."""
    params = dict(model.named_parameters())
    return {name: params[name] for name in strategy.trainable_names(model)}


def save_adapter(model: nn.Module, strategy, directory: str | Path, base: dict) -> None:
    """Write the trainable weights and the JSON that rebuilds them onto `base` (each file atomically).

    The weights are written first, the JSON last: a reader that finds the JSON finds weights of the
    same save or a newer one, and `load_adapter` refuses weights whose keys do not fit the JSON.
    """
    directory = Path(directory)
    meta = {"strategy": strategy.name, "adapter_config": dataclasses.asdict(strategy.cfg),
            "state": strategy.state(), "base": base}
    text = json.dumps(meta, indent=2) + "\n"  # fails before anything is written if the state is not JSON
    atomic_write_safetensors(directory / WEIGHTS, adapter_tensors(model, strategy), metadata={"strategy": strategy.name})
    atomic_write_text(directory / CONFIG, text)


def read_adapter_config(directory: str | Path) -> dict:
    """The adapter's JSON; UserError if the folder or the file is missing or unreadable."""
    directory = Path(directory)
    path = directory / CONFIG
    if not directory.is_dir():
        raise UserError(f"adapter folder {directory} does not exist")
    if not path.is_file() or not (directory / WEIGHTS).is_file():
        raise UserError(f"{directory} holds no adapter: expected {CONFIG} and {WEIGHTS} (written by save_adapter)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    missing = [k for k in ("strategy", "adapter_config", "state", "base") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it was not written by save_adapter")
    return meta


def _adapter_config(fields: dict, path: Path) -> AdapterConfig:
    fields = {k: v for k, v in fields.items() if k not in _RETIRED_OPTIONS}
    known = {f.name for f in dataclasses.fields(AdapterConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"{path} sets adapter options this version does not know: {', '.join(unknown)}")
    return AdapterConfig(**fields)


def load_adapter(model: nn.Module, directory: str | Path):
    """Apply the saved strategy to a fresh base `model`, load its weights; return (model in eval, strategy)."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    cfg = _adapter_config(meta["adapter_config"], directory / CONFIG)
    try:
        strategy = get_strategy(meta["strategy"], cfg)
        num_classes = meta["base"].get("num_classes")
        if num_classes is None:
            raise UserError(f"{directory / CONFIG} does not say the head's num_classes (base.num_classes)")
        model = strategy.apply(model, int(num_classes))
        strategy.load_state(model, meta["state"])
    except AdapterError as e:
        raise UserError(f"cannot rebuild the adapter in {directory} on this model: {e}") from None
    device = next(model.parameters()).device
    try:
        tensors = load_file(directory / WEIGHTS, device=str(device))
    except Exception as e:  # truncated, empty or not a safetensors file at all
        raise UserError(f"adapter weights {directory / WEIGHTS} cannot be read ({_first_line(e)}): the file is "
                        f"truncated or not a safetensors file") from None
    _check_fits(tensors, adapter_tensors(model, strategy), directory / WEIGHTS)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value)
    return model.eval(), strategy


def _check_fits(tensors: dict, trainable: dict, path: Path) -> None:
    """The saved keys must be exactly the rebuilt model's trainable parameters, with the same shapes."""
    expected = {name: p.shape for name, p in trainable.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
        raise UserError(f"adapter weights {path} do not fit the rebuilt model: {'; '.join(parts)}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise UserError(f"adapter weights {path} do not fit the rebuilt model: {name} has shape "
                            f"{tuple(tensors[name].shape)}, the model expects {tuple(shape)}")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
