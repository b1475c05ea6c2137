"""`python -m engine.run`: fine-tune a ViT with one strategy and measure what it forgot.

The paper's protocol: new head, train on the target for `--steps`, validate every `--eval-every`,
keep the best checkpoint by *validation* accuracy (the paper selected on test; we don't), report
its test top-1, and measure source-domain weighted k-NN accuracy of the untouched and the
fine-tuned backbone. With no `--model/--target/--source` it runs offline on the embedded default.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import FLAG_KEYS, RunConfig, build_config, save_yaml
from .errors import UserError

_KNOWN_CLASS_COUNTS = {"embedded": 10, "digits": 10, "shapes": 10, "cifar10": 10, "cifar100": 100}


def parse_args(argv: list[str] | None = None) -> RunConfig:
    p = argparse.ArgumentParser(
        prog="python -m engine.run", description=__doc__.splitlines()[0],
        epilog="Any config key can also be set as key=value, e.g. train.warmup_steps=50 adapter.gate_init=0.2. "
               "Precedence: defaults < --config YAML < flags < key=value.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--config", help="YAML file with config keys (sections model, data, train, adapter, eval)")
    p.add_argument("--strategy", help="full | top_k | linear | lora | block_expansion | selective_lora")
    p.add_argument("--model", help="'embedded' (default) or a timm ViT name, e.g. vit_base_patch16_224.dino")
    p.add_argument("--weights", help="local .pth/.safetensors backbone weights")
    p.add_argument("--num-classes", type=int, help="classes of the new head (default: the target's)")
    p.add_argument("--target", help="embedded | digits | cifar10 | cifar100 | imagefolder:DIR")
    p.add_argument("--source", help="pre-training domain for the k-NN: embedded | shapes | cifar10 | ... ")
    p.add_argument("--data-root", help="folder holding cifar-10-batches-py / cifar-100-python")
    p.add_argument("--loader", help="auto | dali | torch")
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, help="global batch (micro batch x grad accumulation x ranks)")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--optimizer", help="sgd | adamw")
    p.add_argument("--precision", help="fp32 | bf16 (autocast; AVX-512 bf16 on this CPU) | fp16 (CUDA)")
    p.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3 (default 2)")
    p.add_argument("--top-k", type=int, help="top_k: blocks that train")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-targets", help="comma list of q,k,v,proj,fc1,fc2 (default q,v)")
    p.add_argument("--blocks", type=int, help="block_expansion: number of new blocks P")
    p.add_argument("--sparsity-lambda", type=float)
    p.add_argument("--active-blocks", type=int, help="selective_lora budget: exactly K active LoRA blocks")
    p.add_argument("--active-fraction", type=float, help="selective_lora budget: a fraction of the LoRA blocks")
    p.add_argument("--kernels", help="auto | triton | torch | reference")
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="run folder name under --out (default <strategy>-<time>)")
    p.add_argument("--out", help="folder for run folders (default runs)")
    p.add_argument("--dry-run", action="store_true", default=None,
                   help="build the model, print parameters and GFLOPs, exit (no data, weights or training)")
    p.add_argument("--json", action="store_true", default=None, help="with --dry-run: print one JSON object")
    args = p.parse_intermixed_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in FLAG_KEYS}
    return build_config(args.config, flags, args.overrides)


def main(argv: list[str] | None = None) -> int:
    from .train import TrainingDiverged

    try:
        cfg = parse_args(argv)
        if cfg.dry_run:
            return dry_run(cfg)
        run(cfg)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        kept = (f"the last good checkpoint (step {e.last_good_step}) is kept in checkpoints/last"
                if e.last_good_step else "no checkpoint had been written yet")
        print(f"error: loss became {e.loss} at step {e.step}; training stopped, {kept}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _strategy(cfg: RunConfig):
    import adapters
    try:
        return adapters.get_strategy(cfg.strategy, cfg.adapter)
    except ValueError as e:
        raise UserError(str(e)) from None


def _apply(strategy, model, num_classes: int):
    try:
        return strategy.apply(model, num_classes)
    except ValueError as e:
        raise UserError(f"{strategy.name}: {e}") from None


def _set_kernels(name: str) -> None:
    import kernels
    kernels.set_backend(name)


def dry_run(cfg: RunConfig) -> int:
    """Parameters and inference GFLOPs of the model the strategy builds; no data, weights or training."""
    from dataclasses import replace

    from .metrics import gflops_per_image, parameter_counts
    from .models import build_backbone
    from .transforms import Preprocess

    num_classes = cfg.model.num_classes or _KNOWN_CLASS_COUNTS.get(cfg.data.target)
    if num_classes is None:
        raise UserError(f"--dry-run does not read data: give --num-classes for target {cfg.data.target!r}")
    _set_kernels(cfg.adapter.kernels)
    strategy = _strategy(cfg)
    model = _apply(strategy, build_backbone(replace(cfg.model, pretrained=False, weights=None)), num_classes)
    trainable, total = parameter_counts(model)
    size = Preprocess.from_model(model).input_size
    gflops = gflops_per_image(strategy.finalize(model), size)
    out = {"trainable_params": trainable, "total_params": total, "infer_gflops_per_img": round(gflops, 4)}
    if cfg.json:
        print(json.dumps(out))
    else:
        print(f"{cfg.strategy} on {cfg.model.name} ({num_classes} classes): {trainable:,} trainable of "
              f"{total:,} parameters; {gflops:.3f} inference GFLOPs per image")
    return 0


@dataclass
class _Loaders:
    train: object
    val: object
    test: object
    knn_bank: object
    knn_query: object


def _seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run_dir(cfg: RunConfig) -> Path:
    name = cfg.name or f"{cfg.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out) / name
    if (run_dir / "results.json").exists():
        raise UserError(f"run folder {run_dir} already holds results; pick another --name or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.csv").unlink(missing_ok=True)
    return run_dir


def _shared_run_dir(cfg: RunConfig, main_rank: bool, world: int) -> Path:
    """Rank 0 names (and creates) the run folder; the other ranks learn its name from it."""
    holder = [str(_run_dir(cfg)) if main_rank else None]
    if world > 1:
        torch.distributed.broadcast_object_list(holder, src=0)
    return Path(holder[0])


def _limit(split, limit: int | None, seed: int):
    from .data import stratified_split
    if limit is None or len(split) <= limit:
        return split
    _, kept = stratified_split(split, limit / len(split), seed)
    return kept


def run(cfg: RunConfig) -> dict:
    """The whole protocol; returns the results dict it wrote to results.json."""
    from .data import load_domain, stratified_split
    from .evaluate import extract_features, top1_accuracy
    from .export import restore_adapter
    from .knn import knn_accuracy
    from .loaders import make_loader
    from .metrics import gflops_per_image, inference_throughput, parameter_counts, peak_memory_mb
    from .models import build_backbone, timm_spec
    from .report import build_results, format_table, write_results
    from .train import PRECISIONS, init_distributed, train
    from .transforms import Preprocess

    wall = time.perf_counter()
    _seed_everything(cfg.seed)
    _set_kernels(cfg.adapter.kernels)
    strategy = _strategy(cfg)
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
    rank, world = init_distributed()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    main_rank = rank == 0
    run_dir = _shared_run_dir(cfg, main_rank, world)

    # Data: target train/val/test, source train (k-NN bank) / test (k-NN queries).
    target = load_domain(cfg.data.target, cfg.data.data_root, cfg.seed, role="target")
    source = load_domain(cfg.data.source, cfg.data.data_root, cfg.seed, role="source")
    for note in target.notes + source.notes:
        print(f"note: {note}")
    # The target's own augmentation where the config leaves it unset; the saved config records it.
    if cfg.data.crop_scale_min is None:
        cfg.data.crop_scale_min = target.crop_scale_min
    if cfg.data.hflip is None:
        cfg.data.hflip = target.hflip
    if main_rank:
        save_yaml(cfg, run_dir / "config.yaml")
    train_split, val_split = stratified_split(target.train, cfg.data.val_fraction, cfg.seed)
    if len(val_split) == 0:
        raise UserError("the validation split is empty: raise data.val_fraction")
    num_classes = cfg.model.num_classes or target.num_classes
    if num_classes < target.num_classes:
        raise UserError(f"--num-classes {num_classes} is below the target's {target.num_classes} classes")

    torch.manual_seed(cfg.seed)  # the same backbone again at restore time, even from a random init
    backbone = build_backbone(cfg.model).to(device)
    pre = Preprocess.from_model(backbone, crop_scale_min=cfg.data.crop_scale_min, hflip=cfg.data.hflip)
    amp = PRECISIONS[cfg.train.precision]
    micro = cfg.train.batch_size // (cfg.train.grad_accum * world)
    common = dict(loader=cfg.data.loader, workers=cfg.data.workers, device=device, dali_resize=cfg.data.dali_resize)
    eval_bs = cfg.eval.batch_size
    loaders = _Loaders(
        train=make_loader(train_split, pre, train=True, batch_size=max(micro, 1), seed=cfg.seed,
                          rank=rank, world=world, **common),
        val=make_loader(val_split, pre, train=False, batch_size=eval_bs, **common),
        test=make_loader(target.test, pre, train=False, batch_size=eval_bs, **common),
        knn_bank=make_loader(_limit(source.train, cfg.data.knn_train_limit, cfg.seed), pre, train=False,
                             batch_size=eval_bs, **common),
        knn_query=make_loader(_limit(source.test, cfg.data.knn_test_limit, cfg.seed), pre, train=False,
                              batch_size=eval_bs, **common),
    )

    def source_knn(model) -> dict[int, float]:
        bank, bank_y = extract_features(model, loaders.knn_bank, device, amp, desc="k-NN bank")
        query, query_y = extract_features(model, loaders.knn_query, device, amp, desc="k-NN queries")
        return knn_accuracy(bank, bank_y, query, query_y, cfg.eval.knn_k, cfg.eval.knn_temperature,
                            num_classes=source.num_classes)

    knn_before = source_knn(backbone)
    print(f"source {cfg.eval.knn_report_k}-NN accuracy of the untouched backbone: "
          f"{knn_before[cfg.eval.knn_report_k]:.2f}%")

    base = {"model": cfg.model.name, "weights": cfg.model.weights, "num_classes": num_classes,
            "timm": timm_spec(backbone)}
    model = _apply(strategy, backbone, num_classes)
    trainable, total = parameter_counts(model)
    train_gflops = gflops_per_image(model, pre.input_size, train=True,
                                    extra_loss=lambda: strategy.extra_loss(model, cfg.train.steps, cfg.train.steps))
    print(f"{cfg.strategy}: {trainable:,} trainable of {total:,} parameters")

    def save_checkpoint(module, tag: str, info: dict) -> None:
        _save_checkpoint(module, strategy, run_dir / "checkpoints" / tag, base, info, cfg.train.zero_stage,
                         main_rank)

    try:
        result = train(model, strategy, loaders.train, loaders.val, cfg.train, device, run_dir, save_checkpoint,
                       rank=rank, world=world)
    except ValueError as e:
        raise UserError(str(e)) from None

    # Restore the best checkpoint onto a fresh backbone (this is also the adapter round trip).
    if world > 1:
        torch.distributed.barrier()  # rank 0 has finished writing it
    best_dir = run_dir / "checkpoints" / "best"
    model, strategy = restore_adapter(cfg, best_dir)  # the same seed: the same backbone, even from a random init
    model = strategy.finalize(model.to(device))
    if main_rank:
        adapter_dir = run_dir / "adapter"
        shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.copytree(best_dir, adapter_dir)

    target_top1 = top1_accuracy(model, loaders.test, device, amp, desc="test")
    knn_after = source_knn(model)
    values = {
        "strategy": cfg.strategy, "model": cfg.model.name,
        "trainable_params": trainable, "total_params": total,
        "target_top1": target_top1,
        "source_knn_before": knn_before[cfg.eval.knn_report_k],
        "source_knn_after": knn_after[cfg.eval.knn_report_k],
        "train_img_per_s": result.images_per_second,
        "infer_img_per_s": inference_throughput(model, pre.input_size, autocast_dtype=amp),
        "peak_mem_mb": peak_memory_mb(device),
        "train_gflops_per_img": train_gflops,
        "infer_gflops_per_img": gflops_per_image(model, pre.input_size),
        "wall_s": time.perf_counter() - wall,
        **strategy.metrics(model),
    }
    results = build_results(values)
    if main_rank:
        write_results(run_dir, results)
        from .io import atomic_write_json
        atomic_write_json(run_dir / "source_knn.json", {"before": knn_before, "after": knn_after,
                                                        "best_step": result.best_step,
                                                        "best_val_top1": result.best_val_top1,
                                                        "data_wait_fraction": result.data_wait_seconds /
                                                        max(result.train_seconds, 1e-9)})
        print()
        print(format_table(results, {"before": knn_before, "after": knn_after}))
        print(f"\nbest checkpoint: step {result.best_step} (val top-1 {result.best_val_top1:.2f}%); "
              f"run folder: {run_dir}")
    return results


def _save_checkpoint(module, strategy, directory: Path, base: dict, info: dict, zero_stage: int,
                     main_rank: bool) -> None:
    """Write the strategy's trainable weights (gathered under ZeRO-3) and the step info, atomically."""
    import adapters

    from .io import atomic_write_json
    from .train import gathered

    with gathered(module, zero_stage):
        if main_rank:
            adapters.save_adapter(module, strategy, directory, base)
            atomic_write_json(directory / "trainer.json", info)


if __name__ == "__main__":
    sys.exit(main())
