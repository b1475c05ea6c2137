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
without overwriting the last good checkpoint; so do non-finite gradients. Under ZeRO 1-3 DeepSpeed's
optimiser reports them by skipping the step (`engine.skipped_steps`, a host counter, checked every
step); under ZeRO 0 (what one process runs, `engine.distributed.zero_stage_run`) nothing skips, so
the step records on the device whether its gradients were finite, read at the log points and before
a full checkpoint: the weights such a step reached are never saved. On several ranks the log point
averages the loss over them (the global batch's loss) and the validation accuracy is summed over
their shards of the validation split.

Full checkpoints (`engine.checkpoint`) every `checkpoint_every` steps (None: at every eval), at the
last step (a resume then only measures) and on a clean stop (`engine.stop`) hold everything an
uninterrupted run would carry on with: DeepSpeed's state and, beside it, the RNG states, the data
position and the loss summed since the last log point, per rank. `resume` loads one into the fresh
engine of a new process and continues as if nothing had happened: the same batches, the same
random draws, the same metrics.csv rows.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import DEEPSPEED_TAG, FullCheckpoints, load_rank_state, rng_state, set_rng_state
from .distributed import deepspeed_config, gathered, register_container_parameters
from .evaluate import top1_accuracy
from .metrics import sync
from .optim import describe, lr_lambda, make_optimizer, warmup_note
from .precision import PRECISIONS, autocast
from .progress import progress_bar, say
from .stop import StopRequest, TrainingStopped

# train.compile's backend (tests may choose the cheaper aot_eager)
COMPILE_BACKEND = "inductor"
# metrics.csv, one row per log point; eval-only columns are empty on the other rows. `source_knn` is
# the forgetting curve (engine.curve), filled at eval.knn_steps; its step 0 row has no training loss;
# `zeroshot` CLIP's mean zero-shot top-1 at the same steps (eval.zeroshot), empty without it.
METRICS_COLUMNS = ("step", "train_loss", "lr", "skipped_steps", "train_img_per_s", "elapsed_s", "val_top1",
                   "source_knn", "zeroshot")


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
    `index` say where the stream is (the next batch is batch `index` of pass `epoch`), and a stream
    made with them starts there (the loader's `start_at`; a plain iterable replays the pass)."""

    def __init__(self, loader, epoch: int = 0, index: int = 0) -> None:
        if index and index >= len(loader):  # the end of a pass is the start of the next
            epoch, index = epoch + 1, 0
        self.loader, self.epoch, self.index = loader, epoch, index
        self._it = None

    def _start(self):
        if self.index and hasattr(self.loader, "start_at"):
            self.loader.start_at(self.epoch, self.index)
            return iter(self.loader)
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        it = iter(self.loader)
        for _ in range(self.index):
            next(it)
        return it

    def __next__(self):
        while True:
            if self._it is None:
                self._it = self._start()
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
    """The training loss summed on the device since the last log point, and the first steps whose
    loss and whose gradients were not finite (-1: none), so that a step needs no host read."""

    def __init__(self, device: torch.device) -> None:
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_bad_grad = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach()
        self.sum += loss.double()
        self.count += 1
        self.first_bad = _first(self.first_bad, ~torch.isfinite(loss), step)

    def add_gradients(self, grads: list[torch.Tensor], step: int) -> None:
        """Record `step` if any of `grads` holds a NaN or an infinity, on the device: a NaN or an
        infinity makes its sum non-finite (a sum overflows only past 3e38). Summing is the cheap
        reduction: about 1% of a ViT-S full step on a CPU, where an inf-norm (`_foreach_norm`) took 7%."""
        if grads:
            total = torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()
            self.first_bad_grad = _first(self.first_bad_grad, ~torch.isfinite(total), step)

    def read(self, world: int = 1) -> tuple[float, int | None]:
        """(mean loss since the last read over all ranks, the first step whose loss was not finite on
        any rank or None); resets the sum. Collective when world > 1."""
        total = torch.stack([self.sum, torch.full_like(self.sum, self.count)])
        if world > 1:
            torch.distributed.all_reduce(total)
        mean = (total[0] / total[1].clamp(min=1)).item()
        self.sum.zero_()
        self.count = 0
        return mean, self.first_bad_steps(world)[0]

    def first_bad_steps(self, world: int = 1) -> tuple[int | None, int | None]:
        """The first steps whose loss and whose gradients were not finite on any rank (None: none).
        Collective when world > 1."""
        never = torch.iinfo(torch.int64).max
        bad = torch.stack([self.first_bad, self.first_bad_grad])
        bad = torch.where(bad < 0, torch.full_like(bad, never), bad)
        if world > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        return tuple(None if b == never else b for b in bad.tolist())

    def state(self) -> dict:
        return {"sum": self.sum.item(), "count": self.count, "first_bad": int(self.first_bad),
                "first_bad_grad": int(self.first_bad_grad)}

    def load(self, state: dict) -> None:
        self.sum.fill_(state["sum"])
        self.count = state["count"]
        self.first_bad.fill_(state["first_bad"])
        self.first_bad_grad.fill_(state.get("first_bad_grad", -1))  # checkpoints from before ZeRO 0's check


def _first(first: torch.Tensor, bad: torch.Tensor, step: int) -> torch.Tensor:
    """`first` (a step, -1: none yet), or `step` where it is still -1 and `bad` holds: on the device."""
    return torch.where(bad & (first < 0), torch.full_like(first, step), first)


@contextlib.contextmanager
def torch_linear_kept():
    """torch.nn.functional.linear as it was before the block. A ZeRO-3 engine replaces it process-wide
    with DeepSpeed's memory-efficient linear ("this will persist unless manually reset"), which
    would change the arithmetic of every later run in the same process (a sweep's, a notebook's,
    the test suite's)."""
    linear = F.linear
    try:
        yield
    finally:
        F.linear = linear


@torch_linear_kept()
def train(model: nn.Module, strategy, train_loader, val_loader, cfg, device: torch.device,
          run_dir: Path, save_checkpoint, rank: int = 0, world: int = 1, progress: bool = True,
          checkpoints: FullCheckpoints | None = None, resume: Path | None = None, curve=None,
          clock=None) -> TrainResult:
    """Fine-tune `model` in place for the TrainConfig `cfg`; `save_checkpoint(model, tag, info)`
    writes checkpoints/<tag> (adapter form), `checkpoints` the full ones, `resume` names the full
    checkpoint to continue from, `curve` (an engine.curve.ForgettingCurve, or None) is measured at
    its steps. `val_loader` reads this rank's shard of the validation split. `clock` (an
    engine.resume.RunClock, or None) counts validation and the curve as phases of their own."""
    within = clock.within if clock is not None else (lambda phase: contextlib.nullcontext())
    params = dict(model.named_parameters())
    stop_groups = [g for g in strategy.param_groups(model) if g]
    if sorted(sum(stop_groups, [])) != sorted(n for n, p in params.items() if p.requires_grad):
        raise RuntimeError("the strategy's param_groups are not its trainable parameters")
    if not stop_groups:
        raise RuntimeError("the strategy left no trainable parameter")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)  # timm's: each block's forward again in backward, same modules and kernels
    engine, optimizer, scheduler, groups = make_engine(model, cfg, stop_groups, world)
    if rank == 0:
        print(f"global batch {engine.train_batch_size()} = micro-batch {engine.train_micro_batch_size_per_gpu()} "
              f"x accumulation {engine.gradient_accumulation_steps()} x {world} rank(s)")
    amp = PRECISIONS[cfg.precision]
    metrics_path = run_dir / "metrics.csv"
    result = TrainResult()
    losses = _DeviceLoss(device)
    batches = BatchStream(train_loader)
    last_good: int | None = None
    start = 0
    if resume is not None:
        start, result, last_good, batches = _resume(engine, strategy, resume, rank, train_loader, losses)
    _freeze_finished_groups(optimizer, scheduler, groups, params)
    if rank == 0:
        say(describe(cfg))
        if warmup_note(cfg):
            say(f"note: {warmup_note(cfg)}")
    bar = progress_bar(total=cfg.steps, initial=start, desc="train", leave=True, show=progress and rank == 0)

    def stop(step: int, what: str) -> TrainingDiverged:
        bar.close()
        return TrainingDiverged(step, what, last_good)

    def check_finite(mean_loss: float | None = None) -> None:
        """Stop at the first non-finite loss or gradients (ZeRO 0's device record), the earlier first;
        at the same step the loss is the better explanation. `mean_loss`: the log point's, if read."""
        loss_bad, grads_bad = losses.first_bad_steps(world)
        if grads_bad is not None and (loss_bad is None or grads_bad < loss_bad):
            raise stop(grads_bad, "gradients were not finite")
        if loss_bad is not None:
            raise stop(loss_bad, f"loss became {losses.read(world)[0] if mean_loss is None else mean_loss}")

    def row(step: int, mean_loss: float) -> dict:
        # With layer decay the groups' rates differ: the top layer's (the highest) is the run's rate.
        return {"step": step, "train_loss": mean_loss, "lr": max(scheduler.get_last_lr()),
                "skipped_steps": result.skipped_steps, "train_img_per_s": result.images_per_second,
                "elapsed_s": result.train_seconds, "val_top1": None, "source_knn": None, "zeroshot": None}

    if curve is not None and resume is None and curve.due(0):
        with eager(cfg.compile), within("curve"):
            untouched = dict(row(0, None), source_knn=curve.measure(engine.module),
                             zeroshot=curve.measure_zeroshot(engine.module))
        if rank == 0:
            _append_csv(metrics_path, untouched)

    def save_full(step: int) -> Path:
        with gathered(engine.module, cfg.zero_stage):  # the strategy's state reads parameters (gate scores)
            trainer = {"step": step, "last_good": last_good, "result": dataclasses.asdict(result),
                       "strategy": strategy.state()}
        own = {"rng": rng_state(), "data": {"epoch": batches.epoch, "index": batches.index},
               "loss": losses.state()}
        return checkpoints.save(engine, step, trainer, own)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        wait = time.perf_counter()
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        result.data_wait_seconds += time.perf_counter() - wait
        return images, labels

    with StopRequest(world) as stop_request:
        for step in range(start + 1, cfg.steps + 1):
            began = time.perf_counter()
            result.train_images += optimiser_step(engine, strategy, next_batch, cfg, device, step, losses) * world
            strategy.on_step(engine.module, step, cfg.steps, gather=lambda: gathered(engine.module, cfg.zero_stage))
            _freeze_finished_groups(optimizer, scheduler, groups, params)
            result.steps = step
            bar.update(1)
            if engine.skipped_steps > result.skipped_steps:
                result.skipped_steps = engine.skipped_steps
                if result.skipped_steps > cfg.max_skipped_steps:
                    mean_loss, first_bad = losses.read(world)  # a non-finite loss is the better explanation
                    if first_bad is not None:
                        raise stop(first_bad, f"loss became {mean_loss}")
                    if rank == 0:  # the skipped step is on record
                        _append_csv(metrics_path, row(step, mean_loss))
                    raise stop(step, "gradients were not finite (DeepSpeed skipped the optimiser step)")
            evaluating = step % cfg.eval_every == 0 or step == cfg.steps
            curving = curve is not None and curve.due(step)
            log_point = evaluating or curving or step % cfg.log_every == 0
            if log_point:
                sync(device)  # the step's work is done before its time is counted (asynchronous on a GPU)
                result.train_seconds += time.perf_counter() - began
                mean_loss, _ = losses.read(world)
                check_finite(mean_loss)
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{max(scheduler.get_last_lr()):.3g}")
                metrics = row(step, mean_loss)
                if evaluating:
                    with eager(cfg.compile), within("validation"):
                        metrics["val_top1"] = val_top1 = top1_accuracy(engine.module, val_loader, device, amp,
                                                                       desc="val", progress=progress and rank == 0,
                                                                       sharded=True)
                    result.history.append(metrics)
                    info = {"step": step, "val_top1": val_top1}
                    never_saved = step == cfg.steps and result.best_step == 0
                    if never_saved or (strategy.selectable(step, cfg.steps) and val_top1 > result.best_val_top1):
                        result.best_val_top1, result.best_step = val_top1, step
                        save_checkpoint(engine.module, "best", info)
                    save_checkpoint(engine.module, "last", info)
                    last_good = step
                if curving:
                    with eager(cfg.compile), within("curve"):
                        metrics["source_knn"] = curve.measure(engine.module)
                        metrics["zeroshot"] = curve.measure_zeroshot(engine.module)
                if rank == 0:
                    _append_csv(metrics_path, metrics)
                    if evaluating:
                        say(f"step {step}: loss {mean_loss:.4f}  val top-1 {val_top1:.2f}%"
                            + ("  (best)" if result.best_step == step else ""))
            else:
                result.train_seconds += time.perf_counter() - began
            signum = stop_request.agreed()
            due = (step % cfg.checkpoint_every == 0 if cfg.checkpoint_every else evaluating) or step == cfg.steps
            saving = checkpoints is not None and (due or signum)
            if saving and not log_point:
                check_finite()  # a full checkpoint holds only finite weights (a log point has checked already)
            saved = save_full(step) if saving else None
            if signum:
                bar.close()
                raise TrainingStopped(signum, step, saved)
    bar.close()
    return result


def make_engine(model: nn.Module, cfg, stop_groups: list[list[str]], world: int = 1):
    """The DeepSpeed engine that trains `model`'s trainable parameters for the TrainConfig `cfg`,
    with its optimiser (in the strategy's stop groups) and LR schedule: (engine, optimizer, scheduler,
    the parameter names of each optimiser group).

    `train.compile`: DeepSpeed's `engine.compile`, after `deepspeed.initialize`, which compiles the
    module in place (`nn.Module.compile`): its state-dict keys, and so every checkpoint, stay as they
    are (torch.compile before `initialize` would wrap it and prefix every key with `_orig_mod.`),
    and under ZeRO-3 the compiled module is the one DeepSpeed's hooks gather for."""
    import deepspeed

    optimizer = make_optimizer(model, cfg, stop_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]  # before DeepSpeed flattens them
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world))
    if cfg.zero_stage == 3:
        register_container_parameters(engine.module)
    if engine.zero_optimization_stage() == 0 and world == 1:
        # Nothing to reduce: DeepSpeed would still flatten every gradient, all-reduce it over the one
        # rank and copy it back, each step (bench.engine_overhead).
        engine.enable_backward_allreduce = False
    if cfg.compile:
        engine.compile(backend=COMPILE_BACKEND)
    return engine, optimizer, scheduler, groups


def eager(compiled: bool):
    """Where a compiled model runs eagerly: evaluation and the forgetting curve during a compiled
    training (a graph for eval mode and each new batch size would cost more than they take)."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


def optimiser_step(engine, strategy, next_batch, cfg, device: torch.device, step: int, losses: _DeviceLoss) -> int:
    """One optimiser step of the loop (bench.engine_overhead times this very function): `cfg.grad_accum`
    micro-batches from `next_batch()` forward and backward under the run's autocast, with the
    strategy's extra loss, each loss added to `losses` on the device. Returns the images this rank
    trained on; reads nothing back from the device."""
    engine.train()
    amp, trained = PRECISIONS[cfg.precision], 0
    for _ in range(cfg.grad_accum):
        images, labels = next_batch()
        with autocast(device, amp):
            logits = engine(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            extra = strategy.extra_loss(engine.module, step, cfg.steps)
            if extra is not None:
                loss = loss + extra
        losses.add(loss, step)
        engine.backward(loss)
        if engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
            # nothing in DeepSpeed checks them at ZeRO 0 (the one-process default): recorded on the device
            losses.add_gradients([p.grad for p in engine.module.parameters() if p.grad is not None], step)
        engine.step()
        trained += len(labels)
    return trained


def _resume(engine, strategy, path: Path, rank: int, train_loader, losses: _DeviceLoss):
    """Load the full checkpoint at `path` into the fresh `engine` and this process's state; returns
    (step, TrainResult, last good step, BatchStream at the saved position)."""
    loaded, client = engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_module_strict=False)
    if loaded is None:  # verified before training started: this is not the user's doing
        raise RuntimeError(f"DeepSpeed loaded no checkpoint from {path}")
    trainer = client["trainer"]
    strategy.load_state(engine.module, trainer["strategy"])  # gates fixed, block positions
    own = load_rank_state(path, rank)
    losses.load(own["loss"])
    batches = BatchStream(train_loader, own["data"]["epoch"], own["data"]["index"])
    set_rng_state(own["rng"])  # last: nothing may draw between here and the next step
    return trainer["step"], TrainResult(**trainer["result"]), trainer["last_good"], batches


def _freeze_finished_groups(optimizer, scheduler, groups: list[list[str]], params: dict) -> None:
    """Learning rate 0 for each param group whose parameters all stopped requiring grad (see
    `Strategy.param_groups`): under any optimiser and ZeRO stage they then stay exactly as they are."""
    for i, names in enumerate(groups):
        training = [params[n].requires_grad for n in names]
        if all(training) or scheduler.base_lrs[i] == 0.0:
            continue
        if any(training):
            raise RuntimeError(f"the strategy stopped part of a param group ({names[0]} and {len(names) - 1} more); "
                               f"param_groups must group what stops training together")
        scheduler.base_lrs[i] = optimizer.param_groups[i]["lr"] = 0.0


def _append_csv(path: Path, row: dict) -> None:
    """One row more, in the columns the file already has (a run resumed across a version that added a
    column keeps its own header and rows aligned)."""
    new = not path.exists()
    columns = METRICS_COLUMNS
    if not new:
        with open(path, newline="") as f:
            columns = next(csv.reader(f), None) or METRICS_COLUMNS
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
