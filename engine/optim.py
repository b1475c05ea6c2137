"""The optimiser and the learning-rate schedule, built from the train config.

Optimisers come from timm's factory (`timm.optim.create_optimizer_v2`): `OPTIMIZERS` is every name
timm lists except its second-order ones (the loop's backward keeps no graph of the gradients).
One name differs in meaning: `sgd` here is classical momentum, the paper's recipe and this engine's
default; timm's own `sgd` is Nesterov's, which timm also lists as `nesterov`.

Only trainable parameters reach the optimiser, in timm's parameter groups: no weight decay on 1-D
tensors (biases, norms, LoRA gate scores) nor on the model's `no_weight_decay()` set (position
embedding, class token); with `layer_decay`, BEiT's layer-wise learning-rate decay through timm's
grouping: `blocks.i` of N learns at decay^(N - i) of the rate (the final norm with the top block),
the embeddings at decay^(N + 1), the head at the full rate. Each of timm's groups is split further
by the strategy's stop groups (`Strategy.param_groups`: parameters that stop training together),
so that a group frozen mid-run can be given a learning rate of 0.

The learning rate: `lr` holds at `base_batch` images, and `lr_scale` carries it to the global batch
(linear: lr x batch / base_batch, DINO's rule; sqrt: lr x sqrt(batch / base_batch); none). The
schedule is a linear warm-up to it (`warmup_steps`, or `warmup_fraction` of the run), then cosine
to zero (the paper's recipe) or constant, per optimiser step. A warm-up longer than the run is cut
to the run (`warmup_note` says so) when the user did not choose it (the default 15 steps of a
short run); one they chose is refused by the config (`engine.config.check_warmup`).
"""
from __future__ import annotations

import functools
import math

import timm.optim
import torch
from torch import nn

from .errors import UserError

OPTIMIZERS = tuple(name for name in timm.optim.list_optimizers()
                   if not timm.optim.get_optimizer_info(name).second_order)
SCHEDULES = ("cosine", "constant")
LR_SCALES = ("none", "linear", "sqrt")

_TIMM_NAME = {"sgd": "momentum"}  # our name -> timm's, where they differ


def resolved_lr(cfg) -> float:
    """The peak learning rate of a TrainConfig `cfg`: `lr` carried from `base_batch` to the global
    batch by `lr_scale`."""
    ratio = cfg.batch_size / cfg.base_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scale]
    return cfg.lr * factor


def warmup_steps(cfg) -> int:
    """Warm-up length in optimiser steps: `warmup_fraction` of the run when set, else `warmup_steps`,
    cut to the run's steps (a default longer than a short run; a chosen one is refused by the config)."""
    if cfg.warmup_fraction is not None:
        return round(cfg.warmup_fraction * cfg.steps)
    return min(cfg.warmup_steps, cfg.steps)


def warmup_note(cfg) -> str | None:
    """The line that says the warm-up was cut to the run (`warmup_steps`), or None when it was not."""
    if cfg.warmup_fraction is not None or cfg.warmup_steps <= cfg.steps:
        return None
    return (f"train.warmup_steps {cfg.warmup_steps} is longer than the run (train.steps {cfg.steps}): the warm-up "
            f"takes all {cfg.steps} steps, so the learning rate peaks at the last one and does not decay")


def describe(cfg) -> str:
    """One line for the start of training: the optimiser and where its learning rate came from."""
    lr = f"lr {resolved_lr(cfg):.6g}"
    if cfg.lr_scale != "none":
        lr += f" ({cfg.lr_scale} scaling of {cfg.lr:g} at batch {cfg.base_batch} to batch {cfg.batch_size})"
    extra = f", layer decay {cfg.layer_decay:g}" if cfg.layer_decay is not None else ""
    return f"optimizer {cfg.optimizer}, {lr}, warm-up {warmup_steps(cfg)} steps{extra}"


def param_groups(model: nn.Module, cfg, stop_groups: list[list[str]] | None = None) -> list[dict]:
    """timm's parameter groups over the trainable parameters of `model`, in model order: weight
    decay off 1-D tensors and `model.no_weight_decay()`; with `layer_decay`, an `lr_scale` per layer.
    With `stop_groups` (names that stop training together), each group split by them."""
    exempt = tuple(getattr(model, "no_weight_decay", set)())
    if cfg.layer_decay is not None:
        groups = timm.optim.param_groups_layer_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=exempt,
                                                     layer_decay=cfg.layer_decay)
    else:
        groups = timm.optim.param_groups_weight_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=exempt)
    if not stop_groups or len(stop_groups) == 1:
        return groups
    which = {name: i for i, names in enumerate(stop_groups) for name in names}
    stop_of = {id(p): which[name] for name, p in model.named_parameters() if name in which}
    split = []
    for group in groups:
        parts: dict[int, list] = {}
        for p in group["params"]:
            parts.setdefault(stop_of[id(p)], []).append(p)
        split += [{**group, "params": part} for _, part in sorted(parts.items())]
    return split


def make_optimizer(model: nn.Module, cfg, stop_groups: list[list[str]] | None = None) -> torch.optim.Optimizer:
    """The optimiser `cfg.optimizer` over `param_groups(model, cfg, stop_groups)` at the resolved
    learning rate (times each group's layer-decay scale); `cfg` is an engine.config.TrainConfig."""
    optimizer = timm.optim.create_optimizer_v2(param_groups(model, cfg, stop_groups),
                                               opt=_TIMM_NAME.get(cfg.optimizer, cfg.optimizer),
                                               lr=resolved_lr(cfg), momentum=cfg.momentum)
    for group in optimizer.param_groups:  # LambdaLR scales each group's own lr, so the layer scale goes in here
        group["lr"] *= group.get("lr_scale", 1.0)
    return optimizer


def check_optimizer(model: nn.Module, cfg) -> None:
    """What the optimiser settings mean for this model, refused before any work (UserError): an
    optimiser this machine cannot build, layer decay where every trainable parameter sits in one
    layer, and a per-tensor optimiser under ZeRO (see `updates_per_element`). `model` may be on
    the meta device."""
    name = _TIMM_NAME.get(cfg.optimizer, cfg.optimizer)
    try:
        timm.optim.get_optimizer_class(name)  # imports it: APEX and bitsandbytes assert CUDA here
    except (AssertionError, ImportError) as e:
        raise UserError(f"--optimizer {cfg.optimizer} cannot run here: {e}") from None
    if cfg.layer_decay is not None:
        scales = {g["lr_scale"] for g in param_groups(model, cfg)}
        if len(scales) < 2:
            raise UserError(f"train.layer_decay has no effect here: every trainable parameter is in one layer "
                            f"(the strategy trains no backbone block); leave it unset")
    if cfg.zero_stage > 0 and not updates_per_element(cfg.optimizer):
        raise UserError(f"--optimizer {cfg.optimizer} adapts each tensor as a whole (a per-layer norm, shape or "
                        f"mask), but ZeRO stage {cfg.zero_stage} hands the optimiser one flat partition per group: "
                        f"use --zero-stage 0, or an element-wise optimiser such as sgd or adamw")


@functools.lru_cache(maxsize=None)
def updates_per_element(name: str) -> bool:
    """Whether optimiser `name` updates each element from that element's history alone, so that
    DeepSpeed's ZeRO, which flattens each group into one 1-D partition per rank, leaves its steps
    unchanged. Judged by behaviour: four steps on two tensors and on their concatenation must agree
    (float64). The gradients are orthogonal to their tensors and change sign, which is what sets
    off the per-tensor projections (AdamP, SGDP) and masks (the cautious variants)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 48), (64,)]  # above the sizes at which factored optimisers (Adafactor) factor
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = []
    for _ in range(4):
        step = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        grads.append([g - (g * w).sum() / (w * w).sum() * w for g, w in zip(step, start)])

    def run(params, flatten):
        torch.manual_seed(0)  # optimisers that draw random numbers (kron) draw the same ones
        opt = timm.optim.create_optimizer_v2(params, opt=_TIMM_NAME.get(name, name), lr=0.01, weight_decay=0.01)
        for step in grads:
            if flatten:
                params[0].grad = torch.cat([g.flatten() for g in step])
            else:
                for p, g in zip(params, step):
                    p.grad = g.clone()
            opt.step()
        return torch.cat([p.detach().flatten() for p in params])

    with torch.compiler.set_stance("force_eager"):  # the maths, not a compile (Kron's would take a minute here)
        shaped = run([nn.Parameter(w.clone()) for w in start], flatten=False)
        flat = run([nn.Parameter(torch.cat([w.flatten() for w in start]))], flatten=True)
    return torch.allclose(shaped, flat, rtol=1e-9, atol=1e-12)


def lr_lambda(cfg):
    """The LR factor per optimiser step for a TrainConfig `cfg` (LambdaLR's function)."""
    warmup, total = warmup_steps(cfg), cfg.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor
