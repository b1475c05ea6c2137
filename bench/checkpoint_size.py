"""How big a full checkpoint (what `--resume` loads) is for a model and strategy, with no data and
no training run: the model is built from a random init, one SGD step on random images gives the
optimiser its momentum (what a checkpoint after any real step holds), and the checkpoint is written
exactly as a run writes it (`engine.checkpoint.FullCheckpoints`: frozen weights left out).

    python -m bench.checkpoint_size --model vit_base_patch16_224 --strategy lora --lora-rank 8 --num-classes 100

Takes the run's flags (`python -m engine.run --help`); prints every file's size and the total
beside the size of the backbone's weights, and writes them to
`bench/results/checkpoint-size-<device>.{csv,json}` (the run's own `--out` is a run folder, so
this bench has no --out of its own).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .report import format_table, save_or_skip


def main(argv: list[str] | None = None) -> int:
    import deepspeed

    import adapters
    from engine import data
    from engine.checkpoint import FullCheckpoints, identity, rng_state
    from engine.config import parse_args
    from engine.distributed import deepspeed_config, init_distributed
    from engine.models import apply_strategy, build_backbone
    from engine.optim import lr_lambda, make_optimizer

    prog = "python -m bench.checkpoint_size"
    cfg = parse_args(argv, prog=prog, description=__doc__.splitlines()[0])
    num_classes = cfg.model.num_classes or data.num_classes(cfg.data.target, "target")
    init_distributed()
    torch.manual_seed(cfg.seed)
    strategy = adapters.get_strategy(cfg.strategy, cfg.adapter)
    model = apply_strategy(strategy, build_backbone(dataclasses.replace(cfg.model, pretrained=False)), num_classes,
                           cfg.train.kernels)
    params = dict(model.named_parameters())
    groups = [g for g in strategy.param_groups(model) if g]
    optimizer = make_optimizer(model, cfg.train, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train))
    train_cfg = dataclasses.replace(cfg.train, batch_size=1, grad_accum=1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(train_cfg, 1))
    size = data.Preprocess.from_model(model).input_size
    engine.backward(F.cross_entropy(engine(torch.randn(1, 3, size, size)), torch.zeros(1, dtype=torch.long)))
    engine.step()
    trainable = [n for g in groups for n in g]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = FullCheckpoints(Path(tmp), identity(cfg.model.name, cfg.strategy, num_classes, trainable, 1,
                                                          cfg.train.zero_stage), {}, rank=0, world=1, keep=1)
        path = checkpoints.save(engine, 1, {"step": 1, "strategy": strategy.state()},
                                {"rng": rng_state(), "data": {"epoch": 0, "index": 1}})
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
        rows = [{"file": str(p.relative_to(path)), "mb": p.stat().st_size / 2**20} for p in files]
    total = sum(r["mb"] for r in rows)
    backbone = sum(p.numel() * p.element_size() for n, p in params.items() if n not in set(trainable))
    rows.append({"file": "total (full checkpoint)", "mb": total})
    print(format_table(rows, ["file", "mb"], labels={"mb": "MB"}, formats={"mb": ".3f"}))
    trained = sum(params[n].numel() for n in trainable)
    print(f"\n{total:.3f} MB  full checkpoint: {cfg.strategy} on {cfg.model.name}, ZeRO {cfg.train.zero_stage}, "
          f"{len(trainable)} trainable tensors ({trained:,} parameters); "
          f"the frozen weights left out are {backbone / 2**20:.1f} MB")
    command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    save_or_skip(argparse.Namespace(out=None, command=command), "checkpoint-size", rows,
                 meta={"model": cfg.model.name, "strategy": cfg.strategy, "zero_stage": cfg.train.zero_stage,
                       "trainable_tensors": len(trainable), "trainable_params": trained,
                       "frozen_mb_left_out": round(backbone / 2**20, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
