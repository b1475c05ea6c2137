"""The train loop on DeepSpeed: one CPU process up to N GPUs, the same code.

`deepspeed.initialize` gets a concrete config generated from ours (never "auto") and an optimiser
over the trainable parameters only. Mixed precision is autocast with fp32 master weights (bf16 on
CPUs with AVX-512 bf16, or on GPUs). Every `eval_every` steps the validation top-1 decides whether
`checkpoints/best` is replaced; `checkpoints/last` follows training.

A train step reads nothing back from the device: the loss is summed on the device and its
finiteness recorded there, and both are read at the log points (every `log_every` steps and at
every eval), where each point appends a row to metrics.csv. The forgetting curve's steps
(`engine.curve`) are log points too: its k-NN is measured there (step 0 before the first step).
A non-finite loss stops the run at the next log point, naming the step it first appeared at,
without overwriting the last good checkpoint; so do non-finite gradients, which DeepSpeed's ZeRO
optimiser reports by skipping the step (`engine.skipped_steps`, a host counter, checked every step).
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .distributed import deepspeed_config, gathered, register_container_parameters
from .evaluate import top1_accuracy
from .metrics import sync
from .optim import lr_lambda, make_optimizer
from .precision import PRECISIONS, autocast

# metrics.csv, one row per log point; eval-only columns are empty on the other rows. `source_knn` is
# the forgetting curve (engine.curve), filled at eval.knn_steps; its step 0 row has no training loss.
METRICS_COLUMNS = ("step", "train_loss", "lr", "skipped_steps", "train_img_per_s", "elapsed_s", "val_top1",
                   "source_knn")


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became non-finite; carries the step and the last good checkpoint's step."""

    def __init__(self, step: int, what: str, last_good_step: int | None) -> None:
        self.step, self.what, self.last_good_step = step, what, last_good_step
        super().__init__(f"{what} at step {step}")


@dataclass
class TrainResult:
    best_step: int = 0
    best_val_top1: float = -1.0
    steps: int = 0
    train_images: int = 0
    train_seconds: float = 0.0        # time in train steps (excluding evaluation)
    data_wait_seconds: float = 0.0    # time spent waiting for the next batch
    skipped_steps: int = 0            # steps DeepSpeed skipped for non-finite gradients
    history: list[dict] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.train_images / max(self.train_seconds, 1e-9)


class BatchStream:
    """Endless batches from a re-iterable loader, a fresh pass (and shuffle) per epoch; `epoch` and
    `index` say where the stream is (the next batch is batch `index` of pass `epoch`)."""

    def __init__(self, loader) -> None:
        self.loader, self.epoch, self.index = loader, 0, 0
        self._it = None

    def __next__(self):
        while True:
            if self._it is None:
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                if self.index == 0:  # the engine checks len(loader) before training; this would loop forever
                    raise RuntimeError("the training loader yielded no batch") from None
                self._it, self.epoch, self.index = None, self.epoch + 1, 0
                continue
            self.index += 1
            return batch


class _DeviceLoss:
    """The training loss summed on the device since the last log point, and the first step whose
    loss was not finite (-1: none), so that a step needs no host read."""

    def __init__(self, device: torch.device) -> None:
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach()
        self.sum += loss.double()
        self.count += 1
        bad = ~torch.isfinite(loss)
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step), self.first_bad)

    def read(self) -> tuple[float, int | None]:
        """(mean loss since the last read, the first step whose loss was not finite or None); resets the sum."""
        mean, first_bad = (self.sum / max(self.count, 1)).item(), int(self.first_bad)
        self.sum.zero_()
        self.count = 0
        return mean, (first_bad if first_bad >= 0 else None)


def train(model: nn.Module, strategy, train_loader, val_loader, cfg, device: torch.device,
          run_dir: Path, save_checkpoint, rank: int = 0, world: int = 1, progress: bool = True,
          curve=None) -> TrainResult:
    """Fine-tune `model` in place for the TrainConfig `cfg`; `save_checkpoint(model, tag, info)`
    writes checkpoints/<tag>; `curve` (an engine.curve.ForgettingCurve, or None) is measured at its steps."""
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
    batches = BatchStream(train_loader)
    metrics_path = run_dir / "metrics.csv"
    result = TrainResult()
    losses = _DeviceLoss(device)
    last_good: int | None = None
    bar = tqdm(total=cfg.steps, desc="train", disable=not progress or rank != 0)

    def stop(step: int, what: str) -> TrainingDiverged:
        bar.close()
        return TrainingDiverged(step, what, last_good)

    def row(step: int, mean_loss: float) -> dict:
        return {"step": step, "train_loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                "skipped_steps": result.skipped_steps, "train_img_per_s": result.images_per_second,
                "elapsed_s": result.train_seconds, "val_top1": None, "source_knn": None}

    if curve is not None and curve.due(0):
        untouched = dict(row(0, None), source_knn=curve.measure(engine.module))
        if rank == 0:
            _append_csv(metrics_path, untouched)

    for step in range(1, cfg.steps + 1):
        engine.train()
        start = time.perf_counter()
        for _ in range(cfg.grad_accum):
            wait = time.perf_counter()
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            result.data_wait_seconds += time.perf_counter() - wait
            with autocast(device, amp):
                logits = engine(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                extra = strategy.extra_loss(engine.module, step, cfg.steps)
                if extra is not None:
                    loss = loss + extra
            losses.add(loss, step)
            engine.backward(loss)
            engine.step()
            result.train_images += len(labels) * world
        strategy.on_step(engine.module, step, cfg.steps, gather=lambda: gathered(engine.module, cfg.zero_stage))
        result.steps = step
        bar.update(1)
        if engine.skipped_steps > result.skipped_steps:
            result.skipped_steps = engine.skipped_steps
            if result.skipped_steps > cfg.max_skipped_steps:
                mean_loss, first_bad = losses.read()  # a non-finite loss is the better explanation
                if first_bad is not None:
                    raise stop(first_bad, f"loss became {mean_loss}")
                if rank == 0:  # the skipped step is on record
                    _append_csv(metrics_path, row(step, mean_loss))
                raise stop(step, "gradients were not finite (DeepSpeed skipped the optimiser step)")
        evaluating = step % cfg.eval_every == 0 or step == cfg.steps
        curving = curve is not None and curve.due(step)
        if not (evaluating or curving or step % cfg.log_every == 0):
            result.train_seconds += time.perf_counter() - start
            continue

        sync(device)  # the step's work is done before its time is counted (asynchronous on a GPU)
        result.train_seconds += time.perf_counter() - start
        mean_loss, first_bad = losses.read()
        if first_bad is not None:
            raise stop(first_bad, f"loss became {mean_loss}")
        bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
        metrics = row(step, mean_loss)
        if evaluating:
            metrics["val_top1"] = val_top1 = top1_accuracy(engine.module, val_loader, device, amp, desc="val",
                                                           progress=progress)
            result.history.append(metrics)
            info = {"step": step, "val_top1": val_top1}
            never_saved = step == cfg.steps and result.best_step == 0
            if never_saved or (strategy.selectable(step, cfg.steps) and val_top1 > result.best_val_top1):
                result.best_val_top1, result.best_step = val_top1, step
                save_checkpoint(engine.module, "best", info)
            save_checkpoint(engine.module, "last", info)
            last_good = step
        if curving:
            metrics["source_knn"] = curve.measure(engine.module)
        if rank == 0:
            _append_csv(metrics_path, metrics)
            if evaluating:
                bar.write(f"step {step}: loss {mean_loss:.4f}  val top-1 {val_top1:.2f}%"
                          + ("  (best)" if result.best_step == step else ""))
    bar.close()
    return result


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
