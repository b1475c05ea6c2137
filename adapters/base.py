"""The strategy protocol: what every fine-tuning strategy knows about a timm ViT, and nothing else.

A strategy never sees data or the train loop. The engine calls, in order:
`apply` (once, on a fresh backbone) -> per step `extra_loss` and `on_step` -> `finalize` (inference form).
`apply` is the same template for every strategy: new head -> freeze everything -> `insert` (the
strategy's structural change: LoRA modules, block copies) -> train exactly `trainable_names`. That
declared set is also what an adapter file holds. `state()` is JSON that, with the options, rebuilds
the same structure on a fresh base model.
"""
from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from torch import nn

from .options import AdapterConfig


class Strategy:
    """Base class. Subclasses set `name`, declare `trainable_names` and override what they change."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: AdapterConfig) -> None:
        cfg.check()
        self.cfg = cfg

    def apply(self, model: nn.Module, num_classes: int) -> nn.Module:
        """Give `model` a new `num_classes` head, freeze it, `insert`, then train `trainable_names`."""
        model.reset_classifier(num_classes)  # timm's fresh Linear for the target classes
        model.requires_grad_(False)
        self.insert(model)
        mark_trainable(model, self.trainable_names(model))
        return model

    def insert(self, model: nn.Module) -> None:
        """The strategy's change to the frozen model's structure (none by default)."""

    def trainable_names(self, model: nn.Module) -> list[str]:
        """The names (model.named_parameters()) of the parameters that train, in model order."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[list[str]]:
        """`trainable_names` in groups that stop training together (one group unless a strategy
        freezes parameters mid-run). DeepSpeed fixes what its optimiser updates at initialisation
        (flipping `requires_grad` later changes nothing there; under ZeRO a frozen parameter still
        gets a zero gradient and its momentum keeps moving it), so the engine makes each group an
        optimiser param group and gives a group whose parameters all stopped training a learning rate of 0."""
        return [self.trainable_names(model)]

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


def mark_trainable(model: nn.Module, names) -> None:
    """Exactly the parameters in `names` require grad; every other one is frozen."""
    names = set(names)
    params = dict(model.named_parameters())
    unknown = sorted(names - set(params))
    if unknown:
        raise RuntimeError(f"trainable_names lists parameters the model does not have: {unknown[:3]}")
    for name, p in params.items():
        p.requires_grad_(name in names)


def names_under(model: nn.Module, *prefixes: str) -> list[str]:
    """Parameter names inside the submodules `prefixes` ('blocks.3', 'head'), in model order."""
    dotted = tuple(f"{p}." for p in prefixes)
    return [name for name, _ in model.named_parameters() if name.startswith(dotted)]


def head_names(model: nn.Module) -> list[str]:
    """The classifier's parameters: the pre-logits norm (when pooled) and the head."""
    return names_under(model, "fc_norm", "head")


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
