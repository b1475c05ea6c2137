"""`python -m engine.run`: fine-tune a ViT with one strategy and measure what it forgot.

The paper's protocol: new head, train on the target for `--steps`, validate every `--eval-every`,
keep the best checkpoint by *validation* accuracy (the paper selected on test; we don't), report
its test top-1, and measure source-domain weighted k-NN accuracy of the untouched and the
fine-tuned backbone. With no `--model/--target/--source` it runs offline on the embedded default.

A run goes through named phases, each a function below: resolve the config (`parse_args`), start
the processes (`start`), take in a user's DeepSpeed JSON (`adopt_deepspeed`), read the data
(`read_data`), check the model and the batch geometry (`check_run`), and only then claim the run folder and do the expensive work: measure the untouched
source (`measure_source`), train (`fine_tune`), restore the best checkpoint (`restore_best`),
measure it (`measure`) and write the report (`report`, results.json last). Bad input is refused in
the first phases, before any feature is extracted and before a run folder exists. The run folder is
held (`engine.folder_lock`, rank 0) from its claim to the end of the run; SIGINT / SIGTERM in any
phase stops the run with one line naming the phase (`engine.stop`).

`--resume RUN_DIR` runs the same phases in the run's own folder, once rank 0 holds it:
`resume_point` checks the config against the saved one and picks the newest full checkpoint that
verifies (before anything is written), the untouched source's k-NN comes from that checkpoint, and
training continues from it (from step 0 when the run wrote none; not at all when it had finished).
On several ranks evaluation and k-NN extraction are sharded: each sample is read on one rank, and
the accuracies are those one process would get.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import adapters
import kernels

from . import data, feature_cache, progress, resume, run_folder, shift, source_features, zeroshot
from .adapter_files import save_adapter
from .checkpoint import FullCheckpoints, identity
from .config import RunConfig, parse_args, resolved_for_target, save_yaml
from .curve import ForgettingCurve, curve_steps, read_curve
from .distributed import (adopt_deepspeed_config, gathered, init_distributed, micro_batch, sum_over_ranks,
                          zero_stage_run)
from .errors import UserError
from .evaluate import extract_features, top1_accuracy
from .folder_lock import FolderLock
from .io import atomic_write_json
from .knn import knn_correct
from .metrics import gflops_per_image, inference_throughput, parameter_counts, peak_memory_mb
from .models import apply_strategy, build_backbone, check_strategy, restore_model, timm_spec
from .optim import check_optimizer
from .precision import PRECISIONS
from .report import build_results, format_table, write_results
from .stop import Phases, RunStopped, TrainingStopped
from .train import TrainingDiverged, TrainResult, train


def main(argv: list[str] | None = None, began: float | None = None) -> int:
    """The command line; `began` is when the run's time starts (perf_counter: the process's start for
    `python -m engine.run`; this call's by default, for a run started in a process already going)."""
    began = time.perf_counter() if began is None else began
    try:
        cfg = parse_args(argv, description=__doc__.splitlines()[0])
        if cfg.dry_run:
            return dry_run(cfg)
        run(cfg, began)
        return 0
    except UserError as e:
        return _fail(f"error: {e}", 2)
    except TrainingStopped as e:
        if e.checkpoint is None:
            return _fail(str(e), e.exit_code)
        world = int(os.environ.get("WORLD_SIZE", 1))
        return _fail(f"{e}; full checkpoint {e.checkpoint}\nresume with: "
                     f"{resume.resume_command(e.checkpoint.parents[2], world)}", e.exit_code)
    except RunStopped as e:
        if e.run_dir is None:
            return _fail(f"{e}, before the run folder was claimed: nothing was written; run the same command "
                         f"again", e.exit_code)
        world = int(os.environ.get("WORLD_SIZE", 1))
        return _fail(f"{e}; resume with: {resume.resume_command(e.run_dir, world)}", e.exit_code)
    except TrainingDiverged as e:
        kept = (f"the last good checkpoint (step {e.last_good_step}) is kept in checkpoints/last"
                if e.last_good_step else "no checkpoint had been written yet")
        return _fail(f"error: {e.what} at step {e.step}; training stopped, {kept}", 3)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(line: str, status: int) -> int:
    """Print the line that says why the run stopped, on a line of its own (progress bars closed
    first), and return the exit status. Under torchrun every rank that stops says why (rank N > 0
    as `rank N: ...`): torchrun ends the other ranks as soon as one exits, so no rank can wait to
    let rank 0 speak for all."""
    progress.close_bars()
    rank = int(os.environ.get("RANK", "0"))
    print(line if rank == 0 else f"rank {rank}: {line}", file=sys.stderr, flush=True)
    return status


def dry_run(cfg: RunConfig) -> int:
    """The start checks a real start runs (`check_start`), for `--world-size` processes (default: the
    launcher's), on a model built on the meta device; then its parameters and inference GFLOPs. No
    data, weights, device or training: what only the data can judge (an image folder's classes, a
    train split smaller than the world) and what only the device can (fp16, the kernels backend,
    DALI) is left to the run."""
    world = cfg.world_size or int(os.environ.get("WORLD_SIZE", 1))
    num_classes = cfg.model.num_classes or data.num_classes(cfg.data.target, "target")
    if num_classes is None:
        raise UserError(f"--dry-run does not read data: give --num-classes for target {cfg.data.target!r}")
    train_cfg, _ = adopt_deepspeed_config(cfg.train, world)  # the user's DeepSpeed JSON, as a start reads it
    cfg = replace(cfg, train=train_cfg)
    if cfg.train.cache_features and None not in (cfg.data.crop_scale_min, cfg.data.hflip):
        feature_cache.check(cfg)  # else the target's own augmentation decides: the data's to judge
    model = check_start(cfg, num_classes, world)
    trainable, total = parameter_counts(model)
    gflops = _inference_gflops(cfg, num_classes, data.Preprocess.from_model(model).input_size)
    out = {"trainable_params": trainable, "total_params": total, "infer_gflops_per_img": round(gflops, 4)}
    if int(os.environ.get("RANK", 0)) != 0:  # under a launcher: rank 0 speaks
        return 0
    if cfg.json:
        print(json.dumps(out))
        return 0
    micro = micro_batch(cfg.train.batch_size, cfg.train.grad_accum, world)
    print(f"{cfg.strategy} on {cfg.model.name} ({num_classes} classes): {trainable:,} trainable of "
          f"{total:,} parameters; {gflops:.3f} inference GFLOPs per image")
    print(f"start checks passed for {world} process(es): global batch {cfg.train.batch_size} = micro-batch {micro} "
          f"x accumulation {cfg.train.grad_accum} x {world} rank(s), ZeRO stage {zero_stage_run(cfg.train, world)} "
          f"runs, optimizer {cfg.train.optimizer}")
    return 0


def _inference_gflops(cfg: RunConfig, num_classes: int, size: int) -> float:
    """GFLOPs per image of the finalised model, built on the meta device (FlopCounterMode counts
    shapes, not values; the torch backend, whose arithmetic it sees). A strategy whose finalisation
    reads its parameters (selective LoRA's gate scores, to choose the blocks it merges) is finalised
    on an uninitialised CPU copy (what it merges leaves plain linears whatever it chooses), then
    counted on the meta device again."""
    strategy = adapters.get_strategy(cfg.strategy, cfg.adapter)
    with torch.device("meta"):
        model = apply_strategy(strategy, build_backbone(replace(cfg.model, pretrained=False, weights=None)),
                               num_classes, "torch")
    try:
        return gflops_per_image(strategy.finalize(model), size)
    except (NotImplementedError, RuntimeError) as e:
        if "meta" not in str(e):
            raise
    return gflops_per_image(strategy.finalize(model.to_empty(device="cpu")).to("meta"), size)


def check_start(cfg: RunConfig, num_classes: int, world: int):
    """The start checks that need neither data nor a device, shared by a run and `--dry-run`: the
    strategy's options against the model (built on the meta device, which is returned), the batch
    geometry on `world` processes, and the optimiser against the ZeRO stage that will run there (one
    process runs ZeRO 1-2 as stage 0, where a per-tensor optimiser such as LAMB is exact)."""
    model = check_strategy(cfg, num_classes)
    check_optimizer(model, replace(cfg.train, zero_stage=zero_stage_run(cfg.train, world)))
    micro_batch(cfg.train.batch_size, cfg.train.grad_accum, world)
    return model


# -- the phases ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank in the world and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, line: str) -> None:
        """Print on rank 0 only: under torchrun the other ranks would repeat it."""
        if self.main:
            progress.say(line)


@dataclass
class RunData:
    """The domains and splits of a run, and the config resolved for its target."""
    cfg: RunConfig
    target: data.Domain
    source: data.Domain
    train: data.Split
    val: data.Split
    num_classes: int
    bad_images: data.BadImages  # unreadable images met so far (the scan's, then the loaders')


@dataclass
class Loaders:
    train: object
    val: object
    test: object
    knn_bank: object
    knn_query: object
    curve_bank: object = None         # the forgetting curve's capped subsets (None: no curve)
    curve_query: object = None
    curve_sizes: tuple[int, int] = (0, 0)  # their images: bank, queries
    shift: list = dataclasses.field(default_factory=list)  # eval.shift's sets (engine.shift.ShiftSet)
    eval_loader: object = None        # split -> its sharded eval loader (the shift sets')


def start(cfg: RunConfig) -> Runtime:
    """Seed, start torch.distributed, pick the device; refuse a precision or kernels backend it lacks."""
    _seed_everything(cfg.seed)
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
    rank, world = init_distributed(cfg.verbose)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    try:
        kernels.resolve_backend(cfg.train.kernels, device)
    except ValueError as e:  # the one check resolve_backend makes: a backend this device cannot run
        raise UserError(f"--kernels {cfg.train.kernels}: {e}") from None
    return Runtime(rank, world, device)


def read_data(cfg: RunConfig, rt: Runtime) -> RunData:
    """Read (or scan) the target and source domains, resolve the target's augmentation, split off
    the validation set, and decide the head's class count."""
    bad_images = data.BadImages(cfg.data.max_bad_images, say=rt.say, max_pixels=cfg.data.max_image_pixels)
    target = data.load_domain(cfg.data.target, cfg.data.data_root, cfg.seed, role="target", bad_images=bad_images,
                              dtd_partition=cfg.data.dtd_partition)
    source = data.load_domain(cfg.data.source, cfg.data.data_root, cfg.seed, role="source", bad_images=bad_images,
                              dtd_partition=cfg.data.dtd_partition)
    for note in target.notes + source.notes:
        rt.say(f"note: {note}")
    cfg = resolved_for_target(cfg, target.crop_scale_min, target.hflip)
    feature_cache.check(cfg)
    if target.val is not None:  # the data set's official val split (DTD, Flowers102) selects the checkpoint
        train_split, val_split = target.train, target.val
    else:
        train_split, val_split = data.stratified_split(target.train, cfg.data.val_fraction, cfg.seed)
    if len(val_split) == 0:
        raise UserError("the validation split is empty: raise data.val_fraction")
    num_classes = cfg.model.num_classes or target.num_classes
    if num_classes < target.num_classes:
        raise UserError(f"--num-classes {num_classes} is below the target's {target.num_classes} classes")
    return RunData(cfg, target, source, train_split, val_split, num_classes, bad_images)


def adopt_deepspeed(cfg: RunConfig, rt: Runtime) -> RunConfig:
    """The user's DeepSpeed JSON (`--deepspeed-config`) over ours: theirs wins, also for the batch
    geometry the loaders follow; each key of ours it contradicts is reported in one line."""
    train_cfg, notes = adopt_deepspeed_config(cfg.train, rt.world)
    if rt.main:
        for note in notes:
            print(f"note: {note}")
    return replace(cfg, train=train_cfg)


def check_run(run_data: RunData, rt: Runtime) -> list[str]:
    """What only the model and the world size can judge, checked on a meta-device model; returns the
    names of the parameters that will train (what a full checkpoint is checked against)."""
    cfg = run_data.cfg
    model = check_start(cfg, run_data.num_classes, rt.world)
    if len(run_data.train) < rt.world:
        raise UserError(f"the target's train split ({len(run_data.train)} images) is smaller than one batch per rank")
    if rt.main:  # the run folder is rank 0's to claim, and may be taken by the time another rank looks
        if not cfg.resume:
            run_folder.check(cfg.out, cfg.name, _reuse(cfg))
    return [name for name, p in model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class StartPoint:
    """Where a resumed run's training starts: a full checkpoint (None: step 0) and what the run had
    finished before it."""
    checkpoint: Path | None
    step: int
    knn_before: dict[int, float] | None  # the untouched backbone's source k-NN, if measured before


def hold_for_resume(cfg: RunConfig, rt: Runtime) -> FolderLock | None:
    """With --resume: rank 0 holds the run's folder (refused, on every rank, while another process
    does), before anything in it is read or written. Returns the lock on rank 0."""
    if not cfg.resume:
        return None
    lock, _ = _on_rank0(rt, lambda: (FolderLock.take(cfg.resume, "run folder"), None))
    return lock


def resume_point(cfg: RunConfig, ident: dict, rt: Runtime, clock: resume.RunClock) -> StartPoint | None:
    """With --resume: where training continues, once the config and the checkpoint have been checked;
    metrics.csv loses the rows written after it, and `clock` counts the earlier processes. None for a
    new run."""
    if not cfg.resume:
        return None
    resume.check_config(cfg)
    run_dir = Path(cfg.resume)
    path, manifest = resume.find_checkpoint(run_dir, ident, rt.rank, rt.world)
    step, facts = manifest["step"], manifest["facts"]
    clock.carry(facts)
    if path is None:
        rt.say(f"resuming {run_dir}: it wrote no full checkpoint; training starts again from step 0"
               + (" (the untouched backbone's k-NN was measured before)" if "knn_before" in facts else ""))
    elif step >= cfg.train.steps:
        rt.say(f"resuming {run_dir}: training finished at step {step} ({path}); the best checkpoint is "
               f"measured again")
    else:
        rt.say(f"resuming {run_dir} after step {step} from {path}")
    if rt.main:
        resume.rewind_metrics(run_dir, step if path else -1)
    knn = facts.get("knn_before")
    return StartPoint(path, step, None if knn is None else {int(k): v for k, v in knn.items()})  # JSON keys: str


def knn_preprocess(pre: data.Preprocess, cfg: RunConfig) -> data.Preprocess:
    """The source images' preprocessing for k-NN: the model's eval transform, with eval.knn_crop_pct if set."""
    if cfg.eval.knn_crop_pct is None:
        return pre
    return dataclasses.replace(pre, crop_pct=cfg.eval.knn_crop_pct)


def make_loaders(run_data: RunData, pre: data.Preprocess, rt: Runtime) -> Loaders:
    cfg = run_data.cfg
    micro = micro_batch(cfg.train.batch_size, cfg.train.grad_accum, rt.world)
    common = dict(loader=cfg.data.loader, workers=cfg.data.workers, device=rt.device,
                  dali_resize=cfg.data.dali_resize, bad_images=run_data.bad_images)
    eval_bs = cfg.eval.batch_size
    source_pre = knn_preprocess(pre, cfg)

    def eval_loader(split, preprocess=pre):  # sharded: each sample on one rank (engine.evaluate gathers)
        return data.make_loader(split, preprocess, train=False, batch_size=eval_bs, rank=rt.rank, world=rt.world,
                                **common)

    def curve_loader(split):  # read whole on every rank: the curve's subsets are small
        return data.make_loader(split, source_pre, train=False, batch_size=eval_bs, **common)

    loaders = Loaders(
        train=data.make_loader(run_data.train, pre, train=True, batch_size=micro, seed=cfg.seed, rank=rt.rank,
                               world=rt.world, **common),
        val=eval_loader(run_data.val),
        test=eval_loader(run_data.target.test),
        knn_bank=eval_loader(data.capped(run_data.source.train, cfg.data.knn_train_limit, cfg.seed), source_pre),
        knn_query=eval_loader(data.capped(run_data.source.test, cfg.data.knn_test_limit, cfg.seed), source_pre),
    )
    loaders.eval_loader = eval_loader
    loaders.shift = shift.resolve(cfg.eval.shift, run_data.target, pre.resize_size, pre.interpolation,
                                  run_data.bad_images)
    if cfg.eval.knn_curve_limit:
        cap = cfg.eval.knn_curve_limit
        bank = data.capped(run_data.source.train, min(cap, cfg.data.knn_train_limit or cap), cfg.seed)
        query = data.capped(run_data.source.test, min(cap, cfg.data.knn_test_limit or cap), cfg.seed)
        loaders.curve_bank, loaders.curve_query = curve_loader(bank), curve_loader(query)
        loaders.curve_sizes = (len(bank), len(query))
    if len(loaders.train) == 0:
        raise UserError(f"the training loader has no batch: {len(run_data.train)} train images for a "
                        f"micro-batch of {micro} on {rt.world} rank(s)")
    return loaders


def claim_run_dir(cfg: RunConfig, rt: Runtime) -> tuple[Path, FolderLock | None]:
    """Rank 0 claims the run folder and holds it (`engine.run_folder`); the other ranks learn its
    name, or its error. Returns the folder, and the lock on rank 0."""
    def claim():
        lock = run_folder.claim(cfg.out, cfg.name, cfg.strategy, _reuse(cfg))
        return lock, str(lock.folder)

    lock, name = _on_rank0(rt, claim)
    return Path(name), lock


def measure_source(model, loaders: Loaders, cfg: RunConfig, num_source_classes: int, rt: Runtime) -> dict[int, float]:
    """Weighted k-NN accuracy (%) of `model`'s backbone features on the source domain, per k. Each
    rank extracts its shards; the bank is gathered on every rank, each scores its own queries."""
    amp = PRECISIONS[cfg.train.precision]
    bank, bank_y = extract_features(model, loaders.knn_bank, rt.device, amp, desc="k-NN bank", progress=rt.main,
                                    sharded=True)
    query, query_y = extract_features(model, loaders.knn_query, rt.device, amp, desc="k-NN queries",
                                      progress=rt.main)
    ks = cfg.eval.knn_k
    correct = knn_correct(bank, bank_y, query, query_y, ks, cfg.eval.knn_temperature, num_classes=num_source_classes)
    *hits, queries = sum_over_ranks([correct[k] for k in ks] + [len(query)])
    return {k: 100.0 * n / queries for k, n in zip(ks, hits)}


def forgetting_curve(loaders: Loaders, cfg: RunConfig, num_source_classes: int, rt: Runtime) -> ForgettingCurve | None:
    """Source k-NN during training at eval.knn_steps on the capped subsets (None when the curve is off)."""
    if loaders.curve_bank is None:
        return None
    curve = ForgettingCurve(curve_steps(cfg.eval.knn_steps, cfg.train.steps), loaders.curve_bank, loaders.curve_query,
                            ks=cfg.eval.knn_k, report_k=cfg.eval.knn_report_k, temperature=cfg.eval.knn_temperature,
                            num_classes=num_source_classes, device=rt.device,
                            autocast_dtype=PRECISIONS[cfg.train.precision], zero_stage=cfg.train.zero_stage)
    rt.say(curve.describe(*loaders.curve_sizes))
    return curve


def fine_tune(model, strategy, loaders: Loaders, cfg: RunConfig, base: dict, run_dir: Path, rt: Runtime,
              checkpoints: FullCheckpoints, start: Path | None, curve: ForgettingCurve | None = None,
              clock: resume.RunClock | None = None) -> TrainResult:
    """The train loop (from the full checkpoint `start` when resuming); checkpoints go to
    run_dir/checkpoints/{best,last} in adapter form and run_dir/checkpoints/full."""
    def save_checkpoint(module, tag: str, info: dict) -> None:
        with gathered(module, cfg.train.zero_stage):
            if rt.main:
                directory = run_dir / "checkpoints" / tag
                save_adapter(module, strategy, directory, base)
                atomic_write_json(directory / "trainer.json", info)

    return train(model, strategy, loaders.train, loaders.val, cfg.train, rt.device, run_dir, save_checkpoint,
                 rank=rt.rank, world=rt.world, checkpoints=checkpoints, resume=start, curve=curve, clock=clock)


@contextlib.contextmanager
def cached_features(model, run_data: RunData, pre: data.Preprocess, loaders: Loaders, rt: Runtime):
    """Linear probing without augmentation (`engine.feature_cache`): the training split's features
    computed once and the head trained over them inside the block. Yields the loaders to train with."""
    cfg = run_data.cfg
    if not feature_cache.wanted(cfg):
        yield loaders
        return
    if not feature_cache.trains_head_only(model):
        raise RuntimeError("train.cache_features on a model whose backbone trains")
    began = time.perf_counter()
    feats, readable = feature_cache.compute_features(
        model, run_data.train, pre, seed=cfg.seed, batch_size=cfg.eval.batch_size, workers=cfg.data.workers,
        device=rt.device, amp=PRECISIONS[cfg.train.precision], bad_images=run_data.bad_images)
    rt.say(f"cached features of {int(readable.sum())} training images ({feats.shape[1]} wide) in "
           f"{time.perf_counter() - began:.1f} s: the head trains over them")
    train_loader = feature_cache.FeatureLoader(
        feats, torch.as_tensor(run_data.train.labels), readable, seed=cfg.seed, rank=rt.rank, world=rt.world,
        batch_size=micro_batch(cfg.train.batch_size, cfg.train.grad_accum, rt.world))
    with feature_cache.head_over_features(model):
        yield replace(loaders, train=train_loader)


def restore_best(cfg: RunConfig, run_dir: Path, rt: Runtime):
    """The best checkpoint restored onto a fresh backbone (the adapter round trip) and finalised;
    rank 0 copies it to run_dir/adapter. Returns (model, strategy)."""
    if rt.world > 1:
        torch.distributed.barrier()  # rank 0 has finished writing it
    best_dir = run_dir / "checkpoints" / "best"
    model, strategy = restore_model(cfg, best_dir)  # the same seed: the same backbone, even from a random init
    model = strategy.finalize(model.to(rt.device))
    if rt.main:
        adapter_dir = run_dir / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.copytree(best_dir, adapter_dir)
    return model, strategy


def measure(model, strategy, loaders: Loaders, cfg: RunConfig, num_source_classes: int, pre: data.Preprocess,
            rt: Runtime) -> tuple[float, dict[int, float], dict]:
    """Target top-1 and source k-NN of the finalised model, its accuracy under shift, and its inference cost."""
    amp = PRECISIONS[cfg.train.precision]
    target_top1 = top1_accuracy(model, loaders.test, rt.device, amp, desc="test", progress=rt.main, sharded=True)
    shifted = shift.summary(shift.shift_top1(model, loaders.shift, loaders.eval_loader, rt.device, model.num_classes,
                                             amp, progress=rt.main))
    knn_after = measure_source(model, loaders, cfg, num_source_classes, rt)
    iters = cfg.eval.throughput_iters
    cost = {"infer_img_per_s": inference_throughput(model, pre.input_size, iters=iters, autocast_dtype=amp)
            if iters else None,
            "infer_gflops_per_img": gflops_per_image(model, pre.input_size), **strategy.metrics(model), **shifted}
    return target_top1, knn_after, cost


def report(results: dict, knn: dict, result: TrainResult, run_dir: Path, curve: ForgettingCurve | None,
           curve_sizes: tuple[int, int], clock: resume.RunClock) -> None:
    """source_knn.json, forgetting.png (and zeroshot.png, CLIP's zero-shot curve), results.csv /
    results.json (last: it marks the run finished; its wall_s and time_s taken just before, the
    report's own time in them), and the table on screen (rank 0 only)."""
    curve_info = None if curve is None else {
        "steps": curve.steps, "bank": curve_sizes[0], "queries": curve_sizes[1],
        "seconds": round(curve.seconds, 3), "wall_fraction": round(curve.seconds / results["wall_s"], 4)}
    atomic_write_json(run_dir / "source_knn.json", {
        "before": knn["before"], "after": knn["after"], "best_step": result.best_step,
        "best_val_top1": result.best_val_top1,
        "data_wait_fraction": result.data_wait_seconds / max(result.train_seconds, 1e-9), "curve": curve_info})
    if curve is not None:
        from .plots import plot_curves
        plot_curves({results["strategy"]: read_curve(run_dir / "metrics.csv")}, run_dir / "forgetting.png",
                    title=f"forgetting curve: {results['strategy']} on {results['model']}")
        if zeroshot_curve := read_curve(run_dir / "metrics.csv", "zeroshot"):
            plot_curves({results["strategy"]: zeroshot_curve}, run_dir / "zeroshot.png",
                        title=f"zero-shot retention: {results['strategy']} on {results['model']}",
                        ylabel="zero-shot top-1 % (mean over eval.zeroshot)")
    results.update(clock.facts())
    write_results(run_dir, results)
    print()
    print(format_table(results, knn))
    if curve_info:
        print(f"forgetting curve: {len(curve.steps)} points in {curve_info['seconds']:.1f} s "
              f"({100 * curve_info['wall_fraction']:.1f}% of the run's wall time); {run_dir / 'forgetting.png'}")
    print(f"\nbest checkpoint: step {result.best_step} (val top-1 {result.best_val_top1:.2f}%); run folder: {run_dir}")


class TimedPhases(Phases):
    """The run's phases (`engine.stop.Phases`), each timed: `now = phrase` also starts the phrase's
    entry of time_s (`TIMED`) on the run's clock."""

    def __init__(self, clock: resume.RunClock) -> None:
        self.clock = clock
        super().__init__()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "now":
            self.clock.enter(TIMED[value])


# results.json time_s's entry (engine.resume.PHASES) of each phase of run() below
TIMED = {"while starting": "startup", "while reading the data": "data", "while checking the run": "startup",
         "while building the model and the loaders": "startup", "while claiming the run folder": "startup",
         "during the untouched backbone's source k-NN": "source_before", "while setting up training": "train",
         "while caching the training split's features": "train",
         "in training, outside its steps (starting or ending)": "train",  # validation and curve: their own
         "while restoring the best checkpoint (training had finished)": "restore",
         "during the final measurement (training had finished)": "measure", "while writing the report": "report"}


def run(cfg: RunConfig, began: float | None = None) -> dict:
    """The whole protocol, phase by phase; returns the results dict it wrote to results.json. The run
    folder is held until it returns; a signal outside the train loop's steps raises RunStopped naming
    the phase it came in. Its time (wall_s, time_s) counts from `began` (perf_counter; default now)."""
    clock = resume.RunClock(began=time.perf_counter() if began is None else began)
    with TimedPhases(clock) as phase, contextlib.ExitStack() as held:
        rt = start(cfg)
        phase.now = "while reading the data"
        run_data = read_data(adopt_deepspeed(cfg, rt), rt)
        cfg = run_data.cfg
        phase.now = "while checking the run"
        trainable_names = check_run(run_data, rt)
        ident = identity(cfg.model.name, cfg.strategy, run_data.num_classes, trainable_names, rt.world,
                         zero_stage_run(cfg.train, rt.world))
        lock = hold_for_resume(cfg, rt)
        if lock is not None:
            held.callback(lock.release)
        if cfg.resume:
            phase.run_dir = Path(cfg.resume)
        point = resume_point(cfg, ident, rt, clock)

        phase.now = "while building the model and the loaders"
        torch.manual_seed(cfg.seed)  # the same backbone again at restore time, even from a random init
        backbone = build_backbone(cfg.model).to(rt.device)
        pre = data.Preprocess.from_model(backbone, crop_scale_min=cfg.data.crop_scale_min, hflip=cfg.data.hflip)
        loaders = make_loaders(run_data, pre, rt)
        zs = zeroshot.for_run(cfg, pre, rt, run_data.target.classes, run_data.num_classes)  # CLIP
        loader = data.resolve_loader(cfg.data.loader)
        rt.say(f"target {run_data.target.name}: {len(run_data.train)} train, {len(run_data.val)} val, "
               f"{len(run_data.target.test)} test images; source {run_data.source.name}; loader {loader}")
        strategy = adapters.get_strategy(cfg.strategy, cfg.adapter)

        if point is None:
            phase.now = "while claiming the run folder"
            run_dir, lock = claim_run_dir(cfg, rt)
            if lock is not None:
                held.callback(lock.release)
            phase.run_dir = run_dir
        else:
            run_dir = Path(cfg.resume)
        if rt.main:
            save_yaml(cfg, run_dir / "config.yaml")
        source_classes = run_data.source.num_classes
        checkpoints = FullCheckpoints(run_dir, ident, {}, rt.rank, rt.world, cfg.train.keep_checkpoints, clock)
        curve_untouched = None  # the curve's step-0 features, where engine.source_features has them
        if point is None or point.knn_before is None:
            phase.now = "during the untouched backbone's source k-NN"
            if point is None:  # said once config.yaml is written: a stop from here on leaves what --resume takes
                rt.say(f"run folder {run_dir}")
            knn_before, curve_untouched = source_features.measure_untouched(  # shared by a sweep's runs
                backbone, loaders, cfg, source_classes, rt, knn_preprocess(pre, cfg), measure_source)
            checkpoints.facts["knn_before"] = knn_before
            checkpoints.save_facts()  # a restart before the first full checkpoint need not measure it again
        else:  # measured before the run stopped
            knn_before = checkpoints.facts["knn_before"] = point.knn_before
        rt.say(f"source {cfg.eval.knn_report_k}-NN accuracy of the untouched backbone: "
               f"{knn_before[cfg.eval.knn_report_k]:.2f}%")
        zs_before = zs.score(backbone) if zs.score else None  # CLIP's zero-shot accuracy, untouched

        phase.now = "while setting up training"
        base = {"model": cfg.model.name, "weights": cfg.model.weights, "num_classes": run_data.num_classes,
                "timm": timm_spec(backbone)}
        model = apply_strategy(strategy, backbone, run_data.num_classes, cfg.train.kernels)
        zeroshot.start_head(model, zs.head, run_dir, rt.main)  # model.head_init=zeroshot
        trainable, total = parameter_counts(model)
        steps = cfg.train.steps
        train_gflops = gflops_per_image(model, pre.input_size, train=True,
                                        extra_loss=lambda: strategy.extra_loss(model, steps, steps))
        rt.say(f"{cfg.strategy}: {trainable:,} trainable of {total:,} parameters")
        curve = forgetting_curve(loaders, cfg, source_classes, rt)
        if curve is not None:
            curve.untouched, curve.zeroshot = curve_untouched, zs.curve_score
        if feature_cache.wanted(cfg):
            phase.now = "while caching the training split's features"
        with cached_features(model, run_data, pre, loaders, rt) as train_loaders:
            phase.now = "in training, outside its steps (starting or ending)"
            result = fine_tune(model, strategy, train_loaders, cfg, base, run_dir, rt, checkpoints,
                               None if point is None else point.checkpoint, curve, clock)

        phase.now = "while restoring the best checkpoint (training had finished)"
        model, strategy = restore_best(cfg, run_dir, rt)
        rt.say(f"best checkpoint (step {result.best_step}) restored: measuring it")
        phase.now = "during the final measurement (training had finished)"
        target_top1, knn_after, cost = measure(model, strategy, loaders, cfg, source_classes, pre, rt)
        cost.update(zeroshot.summary(zs_before, zs.score and zs.score(model)))
        phase.now = "while writing the report"
        k = cfg.eval.knn_report_k
        results = build_results({
            "strategy": cfg.strategy, "model": cfg.model.name, "trainable_params": trainable, "total_params": total,
            "target_top1": target_top1, "source_knn_before": knn_before[k], "source_knn_after": knn_after[k],
            "train_img_per_s": result.images_per_second, "peak_mem_mb": peak_memory_mb(rt.device),
            "train_gflops_per_img": train_gflops, **clock.facts(), **cost,
            "target": run_data.target.name, "source": run_data.source.name, "seed": cfg.seed, "steps": steps,
            "lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "precision": cfg.train.precision,
            "loader": loader, "optimizer": cfg.train.optimizer, "lr_resolved": cfg.train.lr_resolved})
        if rt.main:
            report(results, {"before": knn_before, "after": knn_after}, result, run_dir, curve, loaders.curve_sizes,
                   clock)
        return results


# -- helpers -------------------------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _on_rank0(rt: Runtime, work):
    """`work()` on rank 0 only, which returns (what rank 0 keeps, what every rank is told): returns
    (kept on rank 0 / None elsewhere, told) on every rank, or raises rank 0's UserError on all."""
    kept, told = None, [None]
    if rt.main:
        try:
            kept, told[0] = work()
        except UserError as e:
            told = [e]
    if rt.world > 1:
        torch.distributed.broadcast_object_list(told, src=0)
    if isinstance(told[0], UserError):
        raise told[0]
    return kept, told[0]


def _reuse(cfg: RunConfig) -> str | None:
    """How the user allows an existing run folder to be written into (`engine.run_folder.REUSE`)."""
    return "overwrite" if cfg.overwrite else None


if __name__ == "__main__":
    sys.exit(main(began=time.perf_counter() - resume.process_age()))  # the imports count as start-up
