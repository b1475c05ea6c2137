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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .distributed import deepspeed_config, gathered, register_container_parameters
from .evaluate import top1_accuracy
from .optim import lr_lambda, make_optimizer
from .precision import PRECISIONS, autocast


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
        if empty:  # the engine checks len(loader) before training; this would loop forever
            raise RuntimeError("the training loader yielded no batch")
        epoch += 1


def train(model: nn.Module, strategy, train_loader, val_loader, cfg: TrainConfig, device: torch.device,
          run_dir: Path, save_checkpoint, rank: int = 0, world: int = 1, progress: bool = True) -> TrainResult:
    """Fine-tune `model` in place; `save_checkpoint(model, tag, info)` writes checkpoints/<tag>."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the strategy left no trainable parameter")
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world))
    if cfg.zero_stage == 3:
        register_container_parameters(engine.module)
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
