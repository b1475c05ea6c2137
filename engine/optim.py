"""The optimiser and the learning-rate schedule, built from the train config.

Only trainable parameters reach the optimiser, in param groups that share the options (a strategy
may ask for several: `Strategy.param_groups`). The schedule is a linear warm-up to the base LR,
then cosine to zero (the paper's recipe) or constant, per optimiser step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


def make_optimizer(groups: list[list[nn.Parameter]], cfg) -> torch.optim.Optimizer:
    """One param group per list in `groups`; `cfg` is an engine.config.TrainConfig."""
    params = [{"params": group} for group in groups]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(cfg):
    """The LR factor per optimiser step for a TrainConfig `cfg` (LambdaLR's function)."""
    warmup, total = min(cfg.warmup_steps, cfg.steps), cfg.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor
