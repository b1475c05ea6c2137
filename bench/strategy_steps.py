"""What `python -m bench.strategies` times: one train step (and one finalised forward) of every
strategy, of the peers doing the same work, and of the bounds, on random images.

A provider is a model with its train step: the strategies through `adapters` in a plain torch loop
(the optimiser the engine makes, `engine.optim.make_optimizer`); HF peft's LoRA on timm
(`get_peft_model`, a `LoraConfig`, the new head in `modules_to_save`); plain timm full fine-tuning;
the engine's own step for `full` (DeepSpeed's engine built as `engine.train` builds it: forward,
backward and step through it, the loss summed and checked on the device); the frozen lower bound
(the frozen model's forward and the backward to its input: what every LoRA pays at least); and the
cached linear probe (the head's step over the backbone's features, `engine.feature_cache`).
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import adapters
from adapters import AdapterConfig
from adapters.selective_lora import budget_size
from engine.config import TrainConfig
from engine.metrics import explicit_attention, gflops_per_image, sync
from engine.models import features
from engine.optim import make_optimizer

from .strategy_memory import rss_kib

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


@dataclass
class Provider:
    label: str
    kind: str                                 # strategy | lora-target | peer | engine | bound | cached
    model: nn.Module
    step: Callable[[], None]                  # one training step on the bench batch
    infer_model: nn.Module | None = None      # what inference runs (finalised); None: no inference row
    note: str = ""
    trainable_params: int = 0
    train_flops: int = 0                      # per image, one forward + backward
    infer_flops: int | None = None            # per image, the finalised forward
    extra: dict = field(default_factory=dict)


def make_batch(batch: int, size: int, num_classes: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    return x, torch.randint(0, num_classes, (batch,), generator=g).to(device)


def base_model(name: str, size: int, num_classes: int, device: str) -> nn.Module:
    """The timm ViT the strategies start from, the same random weights every time (seeded)."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=size).to(device)


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


def peft_provider(label: str, target_regex: str, model: nn.Module, x, y) -> Provider:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=PEER_RANK, lora_alpha=PEER_RANK, target_modules=target_regex, modules_to_save=["head"])
    peft_model = get_peft_model(model, config).train()
    p = Provider(label, "peer", peft_model, optimiser_step(peft_model, x, y), note=f"HF peft {_peft_version()}")
    p.extra["finalize"] = lambda m: m.merge_and_unload()
    return p


def engine_full_provider(model: nn.Module, x, y, batch: int) -> Provider:
    """`full` through DeepSpeed's engine: the loop's own step (bench.engine_overhead.engine_step, which
    calls engine.train's make_engine and optimiser_step)."""
    from engine.distributed import init_distributed

    from .engine_overhead import engine_step

    init_distributed()
    # counted before DeepSpeed hooks the gradients (a backward outside the engine would confuse ZeRO)
    flops = round(gflops_per_image(model, x.shape[-1], train=True, batch=1) * 1e9)
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
    p.train_flops = _counted(lambda: step(), model)
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
    p.train_flops = _counted(head_step, model.head)
    return p


def _counted(fn: Callable[[], None], model: nn.Module) -> int:
    """FLOPs of one call of fn (FlopCounterMode, explicit attention), per image of the bench batch."""
    counter = FlopCounterMode(display=False)
    with explicit_attention(model), counter:
        fn()
    return counter.get_total_flops()


def finish(p: Provider, size: int, batch: int) -> Provider:
    """Fill in the counts: trainable parameters, train FLOPs per image, the finalised model and its FLOPs."""
    if p.kind in ("bound", "cached"):  # counted over the bench batch
        p.train_flops //= batch
    elif p.kind != "engine":
        p.trainable_params = sum(q.numel() for q in p.model.parameters() if q.requires_grad)
        p.train_flops = round(gflops_per_image(p.model, size, train=True, batch=1) * 1e9)
    finalize = p.extra.pop("finalize", None)
    if finalize is not None:  # on a copy: the model keeps training in the timed rounds
        p.infer_model = finalize(copy.deepcopy(p.model)).eval()
        p.infer_flops = round(gflops_per_image(p.infer_model, size, batch=1) * 1e9)
    return p


def timed(fn: Callable[[], None], steps: int, device: str) -> float:
    """Seconds of `steps` calls of fn."""
    sync(torch.device(device))
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(torch.device(device))
    return time.perf_counter() - t0


def step_memory_mb(fn: Callable[[], None], device: str) -> float:
    """Peak memory of one call of fn above the memory before it: RSS on the CPU (Linux: the peak is
    reset through /proc/self/clear_refs), max allocated on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - before) / 1024


@contextlib.contextmanager
def saved_activations(model: nn.Module):
    """Inside the block, count the bytes of the tensors autograd keeps for backward (unique storages,
    parameters excluded); yields a dict whose "mb" holds the total on the way out."""
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen: dict[int, int] = {}
    total = {"mb": 0.0}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total["mb"] = sum(seen.values()) / 2**20


def _peft_version() -> str:
    import peft
    return peft.__version__
