"""What `python -m bench.strategies` times: one train step (and one finalised forward) of every
strategy, of the peers doing the same work, and of the bounds, on random images.

A provider is a model with its train step: the strategies through `adapters` in a plain torch loop
(the optimiser the engine makes, `engine.optim.make_optimizer`); HF peft's LoRA on timm
(`get_peft_model`, a `LoraConfig`, the new head in `modules_to_save`, the same optimiser), built and
timed in the peer worker (bench/peers.py: peft cannot be imported beside this project's `kernels`);
plain timm full fine-tuning;
the engine's own step for `full` (DeepSpeed's engine built as `engine.train` builds it: forward,
backward and step through it, the loss summed and checked on the device); the frozen lower bound
(the frozen model's forward and the backward to its input: what every LoRA pays at least); and the
cached linear probe (the head's step over the backbone's features, `engine.feature_cache`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import adapters
from adapters import AdapterConfig
from adapters.selective_lora import budget_size
from engine.config import TrainConfig
from engine.models import features
from engine.optim import _TIMM_NAME, make_optimizer, resolved_lr

from .peers import PeerWorker
from .step_measures import counted_flops, flops_per_image

# label -> (strategy, adapter options, note); selective LoRA's gates are fixed at the fraction given.
STRATEGY_ROWS = {
    "full": ("full", {}, ""),
    "top_k_3": ("top_k", {"top_k": 3}, ""),
    "linear": ("linear", {}, ""),
    **{f"lora_r{r}": ("lora", {"lora_rank": r}, "q,v") for r in (4, 8, 16)},
    **{f"block_expansion_{p}": ("block_expansion", {"blocks": p}, "") for p in (1, 2, 3, 4)},
    **{f"selective_lora_{round(f * 100)}": ("selective_lora", {"active_fraction": f}, "q,v, gates fixed")
       for f in (0.1, 0.5, 1.0)},
}
# LoRA r 8 on the target sets the peer comparison needs (q,v is lora_r8 above)
OUR_LORA_TARGETS = {"lora_r8_fc1,fc2": "fc1,fc2", "lora_r8_proj": "proj", "lora_r8_q,k,v": "q,k,v"}
# peft's target_modules (a regex, fully matched: "proj" alone would also take patch_embed.proj)
PEFT_TARGETS = {"peft_r8_fc1,fc2": r".*\.mlp\.fc[12]", "peft_r8_proj": r".*\.attn\.proj",
                "peft_r8_qkv": r".*\.attn\.qkv"}
PEER_RANK = 8
# the peer pairs: (ours, theirs, what is compared); "different work" marks peft's whole-qkv LoRA
PEER_PAIRS = (("lora_r8_fc1,fc2", "peft_r8_fc1,fc2", "identical work"),
              ("lora_r8_proj", "peft_r8_proj", "identical work"),
              ("lora_r8", "peft_r8_qkv", "different work: ours q,v, peft all of qkv (peft#1705)"),
              ("lora_r8_q,k,v", "peft_r8_qkv", "different work: ours q,k,v as 3 segments, peft one qkv LoRA"),
              ("engine_full", "timm_full_plain", "the engine's overhead on full fine-tuning"))
BOUND = "frozen_lower_bound"
CACHED = "linear_cached"
# every row, in the order they take turns (bench.strategies builds them)
ROW_LABELS = (*STRATEGY_ROWS, *OUR_LORA_TARGETS, *PEFT_TARGETS, "timm_full_plain", "engine_full", BOUND, CACHED)


@dataclass
class Provider:
    label: str
    kind: str                                 # strategy | lora-target | peer | engine | bound | cached
    model: nn.Module | None                   # None: the provider lives in `worker` under its label
    step: Callable[[], None] | None           # one training step on the bench batch (None: in `worker`)
    infer_model: nn.Module | None = None      # what inference runs (finalised); None: no inference row
    note: str = ""
    trainable_params: int = 0
    train_flops: int = 0                      # per image, one forward + backward
    infer_flops: int | None = None            # per image, the finalised forward
    worker: PeerWorker | None = None          # the peer worker that builds, measures and times it
    extra: dict = field(default_factory=dict)


def optimiser_step(model: nn.Module, x, y) -> Callable[[], None]:
    """A plain torch loop's step over the model's trainable parameters with the engine's optimiser."""
    optimizer = make_optimizer(model, TrainConfig())

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def strategy_provider(label, strategy_name, options, note, model, x, y, kernels_backend) -> Provider:
    strategy = adapters.get_strategy(strategy_name, AdapterConfig(**options))
    model = adapters.use_kernels(strategy.apply(model, model.num_classes), kernels_backend).train()
    if strategy_name == "selective_lora":
        # the k first blocks (equal scores: ties go to the earlier block), so backward runs through all
        strategy.fix_gates(strategy.top_k(budget_size(strategy.cfg, strategy.state()["total_blocks"])))
    p = Provider(label, "strategy", model, optimiser_step(model, x, y), note=note)
    p.extra["finalize"] = strategy.finalize
    return p


def optimiser_spec(cfg: TrainConfig) -> dict:
    """What `make_optimizer` builds for `cfg` without layer decay, as timm's factory takes it: the
    peer worker builds the same optimiser over timm's parameter groups (bench/peers.py)."""
    assert cfg.layer_decay is None, "the peer worker builds no layer-decay groups"
    return {"opt": _TIMM_NAME.get(cfg.optimizer, cfg.optimizer), "lr": resolved_lr(cfg), "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay}


def peft_provider(label: str, target_regex: str, worker: PeerWorker, model: str, size: int, num_classes: int,
                  batch: int, device: str, amp: torch.dtype | None) -> Provider:
    """HF peft's LoRA r 8 on `target_regex` of the bench model, built in `worker` with the bench batch
    and the engine's optimiser; its counts come from there."""
    info = worker.call("peft_vit", label=label, model=model, img_size=size, num_classes=num_classes, batch=batch,
                       device=device, target_modules=target_regex, rank=PEER_RANK,
                       optimizer=optimiser_spec(TrainConfig()), amp=str(amp).removeprefix("torch.") if amp else None)
    return Provider(label, "peer", None, None, note=f"HF peft {info['peft']}, in a worker process",
                    trainable_params=info["trainable_params"], train_flops=info["train_flops"],
                    infer_flops=info["infer_flops"], worker=worker, extra={"optimizer": info["optimizer"]})


def engine_full_provider(model: nn.Module, x, y, batch: int) -> Provider:
    """`full` through DeepSpeed's engine: the loop's own step (bench.engine_overhead.engine_step, which
    calls engine.train's make_engine and optimiser_step)."""
    from engine.distributed import init_distributed

    from .engine_overhead import engine_step

    init_distributed()
    # counted before DeepSpeed hooks the gradients (a backward outside the engine would confuse ZeRO)
    flops = flops_per_image(model, x.shape[-1], train=True)
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    # without clipping (the engine's default clips at 1.0): the plain loop's work exactly
    cfg = TrainConfig(batch_size=batch, grad_clip=None)
    step = engine_step(model, adapters.get_strategy("full", AdapterConfig()), cfg, (x, y), x.device)
    return Provider("engine_full", "engine", model, step,
                    note="DeepSpeed, default ZeRO 2 (stage 0 on one process), no clipping, engine.train's step",
                    trainable_params=trainable, train_flops=flops)


def bound_provider(model: nn.Module, x, y) -> Provider:
    """The frozen model's forward and the backward to its input: no weight gradient anywhere."""
    for param in model.parameters():
        param.requires_grad_(False)
    x_in = x.clone().requires_grad_(True)

    def step():
        x_in.grad = None
        F.cross_entropy(model(x_in), y).backward()
    p = Provider(BOUND, "bound", model, step, note="forward + backward to the input")
    p.train_flops = counted_flops(step, model)
    return p


def cached_provider(model: nn.Module, x, y) -> Provider:
    """Linear probing over cached features: the head's step over the backbone's features of the batch."""
    strategy = adapters.get_strategy("linear", AdapterConfig())
    model = strategy.apply(model, model.num_classes).train()
    with torch.no_grad():
        feats = features(model, x)
    head_step = optimiser_step(model.head, feats, y)
    p = Provider(CACHED, "cached", model.head, head_step, note="engine.feature_cache: the head over features")
    p.trainable_params = adapters.trainable_parameter_count(model)
    p.train_flops = counted_flops(head_step, model.head)
    return p


def finish(p: Provider, size: int, batch: int) -> Provider:
    """Fill in the counts: trainable parameters, train FLOPs per image, the finalised model and its FLOPs
    (a provider in the peer worker has them already)."""
    if p.worker is not None:
        return p
    if p.kind in ("bound", "cached"):  # counted over the bench batch
        p.train_flops //= batch
    elif p.kind != "engine":
        p.trainable_params = sum(q.numel() for q in p.model.parameters() if q.requires_grad)
        p.train_flops = flops_per_image(p.model, size, train=True)
    finalize = p.extra.pop("finalize", None)
    if finalize is not None:  # on a copy: the model keeps training in the timed rounds
        p.infer_model = finalize(copy.deepcopy(p.model)).eval()
        p.infer_flops = flops_per_image(p.infer_model, size)
    return p
