"""The strategy protocol: what every fine-tuning strategy knows about a timm ViT, and nothing else.

A strategy never sees data or the train loop. The engine calls, in order:
`apply` (once, on a fresh backbone) -> per step `extra_loss` and `on_step` -> `finalize` (inference form).
`state()` is JSON that, with the config, rebuilds the same structure on a fresh base model.
"""
from __future__ import annotations

import contextlib

from typing import ClassVar

import torch
from torch import nn


class Strategy:
    """Base class: freezes nothing, trains everything. Subclasses override what they change."""

    name: ClassVar[str] = ""

    def __init__(self, cfg) -> None:
        self.cfg = cfg  # engine.config.AdapterConfig

    def apply(self, model: nn.Module, num_classes: int) -> nn.Module:
        """Give `model` a new `num_classes` head, freeze/insert as the strategy requires, return it."""
        new_head(model, num_classes)
        return model

    def extra_loss(self, model: nn.Module, step: int, total_steps: int) -> torch.Tensor | None:
        """A term added to the task loss (selective LoRA's sparsity penalty); None for most."""
        return None

    def on_step(self, model: nn.Module, step: int, total_steps: int, gather=contextlib.nullcontext) -> None:
        """Called after each optimiser step (selective LoRA's budget mode fixes its gates here).

        `gather()` is a context in which parameters can be read on the host (ZeRO-3 partitions them
        outside a forward); a strategy enters it only at the steps where it reads them.
        """

    def selectable(self, step: int, total_steps: int) -> bool:
        """Whether a checkpoint taken after `step` may be kept as best (False while the structure
        is still being searched, e.g. selective LoRA's budget mode before its gates are fixed)."""
        return True

    def finalize(self, model: nn.Module) -> nn.Module:
        """Return the inference form (LoRA merged, inactive blocks dropped). May modify in place."""
        return model

    def state(self) -> dict:
        """JSON-serialisable structure (positions, gates) saved with checkpoints and adapters."""
        return {}

    def load_state(self, model: nn.Module, state: dict) -> None:
        """Restore what `state()` returned onto a model that `apply` built."""

    def metrics(self, model: nn.Module) -> dict:
        """Extra fields for results.json (selective LoRA: active_blocks, total_blocks)."""
        return {}


def new_head(model: nn.Module, num_classes: int) -> None:
    """Replace the classifier with a fresh Linear for the target classes (timm's reset_classifier)."""
    model.reset_classifier(num_classes)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def unfreeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(True)


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that make up the classifier: the pre-logits norm (if pooled) and the head."""
    return [m for m in (getattr(model, "fc_norm", None), getattr(model, "head", None)) if m is not None]


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
