"""The train loop on DeepSpeed: one CPU process up to N GPUs, the same code.

`deepspeed.initialize` gets a concrete config generated from ours (never "auto") and an optimiser
over the trainable parameters only. Mixed precision is autocast with fp32 master weights (bf16 on
the CPU's AVX-512 units, or on GPUs). Every `eval_every` steps the validation top-1 decides whether
`checkpoints/best` is replaced; `checkpoints/last` follows training. A non-finite loss stops the
run without overwriting the last good checkpoint.
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .evaluate import top1_accuracy
from .metrics import autocast

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; carries the step and the last good checkpoint's step."""

    def __init__(self, step: int, loss: float, last_good_step: int | None) -> None:
        self.step, self.loss, self.last_good_step = step, loss, last_good_step
        super().__init__(f"loss became {loss} at step {step}")


@dataclass
class TrainResult:
    best_step: int
    best_val_top1: float
    steps: int
    train_images: int
    train_seconds: float          # time in train steps (excluding evaluation)
    data_wait_seconds: float      # time spent waiting for the next batch
    history: list[dict] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.train_images / max(self.train_seconds, 1e-9)


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed; a plain single process needs no launcher."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(key, value)
    if int(os.environ["WORLD_SIZE"]) == 1:
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce on first use (about a
        # minute here); one process has nothing to reduce, so skip it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """A concrete DeepSpeed config. `batch_size` is the global batch: micro x accumulation x ranks."""
    micro, rest = divmod(cfg.batch_size, cfg.grad_accum * world)
    if micro == 0 or rest:
        raise ValueError(f"batch size {cfg.batch_size} must be a multiple of grad_accum ({cfg.grad_accum}) "
                         f"x ranks ({world})")
    config = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,   # SGD is fine under ZeRO; DeepSpeed only vets Adam-likes
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip:
        config["gradient_clipping"] = cfg.grad_clip
    return config


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to the base LR, then cosine to zero (or constant), per optimiser step."""
    warmup, total = min(cfg.warmup_steps, cfg.steps), cfg.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def gathered(model: nn.Module, zero_stage: int):
    """Outside a forward, ZeRO-3 parameters are partitioned: gather them (read-only) for host code."""
    import contextlib

    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _register_container_parameters(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters only around that module's own forward. Parameters held
    in a ParameterDict/ParameterList child (LoRA's A, B and gate scores) are used by the parent's
    forward instead, so they are registered as the parent's external parameters."""
    import deepspeed

    for module in model.modules():
        for child in module.children():
            if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
                for p in child.parameters():
                    deepspeed.zero.register_external_parameter(module, p)


def _batches(loader):
    """Endless batches, a fresh pass (and shuffle) per epoch."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training loader yielded no batch: fewer samples than one batch?")
        epoch += 1


def train(model: nn.Module, strategy, train_loader, val_loader, cfg: TrainConfig, device: torch.device,
          run_dir: Path, save_checkpoint, rank: int = 0, world: int = 1, progress: bool = True) -> TrainResult:
    """Fine-tune `model` in place; `save_checkpoint(model, tag, info)` writes checkpoints/<tag>."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the strategy left no trainable parameter")
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world))
    if cfg.zero_stage == 3:
        _register_container_parameters(engine.module)
    amp = PRECISIONS[cfg.precision]
    batches = _batches(train_loader)
    metrics_path = run_dir / "metrics.csv"
    best = TrainResult(best_step=0, best_val_top1=-1.0, steps=0, train_images=0, train_seconds=0.0,
                       data_wait_seconds=0.0)
    last_good: int | None = None
    running_loss, running_n = 0.0, 0
    bar = tqdm(total=cfg.steps, desc="train", disable=not progress or rank != 0)
    for step in range(1, cfg.steps + 1):
        engine.train()
        start = time.perf_counter()
        for _ in range(cfg.grad_accum):
            wait = time.perf_counter()
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            best.data_wait_seconds += time.perf_counter() - wait
            with autocast(device, amp):
                logits = engine(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                extra = strategy.extra_loss(engine.module, step, cfg.steps)
                if extra is not None:
                    loss = loss + extra
            value = float(loss.detach())
            if not math.isfinite(value):
                bar.close()
                raise TrainingDiverged(step, value, last_good)
            engine.backward(loss)
            engine.step()
            running_loss += value
            running_n += 1
            best.train_images += len(labels) * world
        strategy.on_step(engine.module, step, cfg.steps, gather=lambda: gathered(engine.module, cfg.zero_stage))
        best.train_seconds += time.perf_counter() - start
        best.steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_top1 = top1_accuracy(engine.module, val_loader, device, amp, desc="val", progress=progress)
            row = {"step": step, "train_loss": running_loss / max(running_n, 1), "val_top1": val_top1,
                   "lr": scheduler.get_last_lr()[0], "train_img_per_s": best.images_per_second,
                   "elapsed_s": best.train_seconds}
            running_loss, running_n = 0.0, 0
            best.history.append(row)
            info = {"step": step, "val_top1": val_top1}
            never_saved = step == cfg.steps and best.best_step == 0
            if never_saved or (strategy.selectable(step, cfg.steps) and val_top1 > best.best_val_top1):
                best.best_val_top1, best.best_step = val_top1, step
                save_checkpoint(engine.module, "best", info)
            save_checkpoint(engine.module, "last", info)
            last_good = step
            if rank == 0:
                _append_csv(metrics_path, row)
                bar.write(f"step {step}: loss {row['train_loss']:.4f}  val top-1 {val_top1:.2f}%"
                          + ("  (best)" if best.best_step == step else ""))
    bar.close()
    return best


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
