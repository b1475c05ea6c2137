"""How big a full checkpoint (what `--resume` loads) is for a model and strategy, with no data and
no training run: the model is built from a random init, one SGD step on random images gives the
optimiser its momentum (what a checkpoint after any real step holds), and the checkpoint is written
exactly as a run writes it (`engine.checkpoint.FullCheckpoints`: frozen weights left out).

    python -m bench.checkpoint_size --model vit_base_patch16_224 --strategy lora --lora-rank 8 --num-classes 100

Takes the run's flags (`python -m engine.run --help`); prints every file's size and the total
beside the size of the backbone's weights.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    import deepspeed

    import adapters
    from engine import data
    from engine.checkpoint import FullCheckpoints, identity, rng_state
    from engine.config import parse_args
    from engine.distributed import deepspeed_config, init_distributed
    from engine.models import apply_strategy, build_backbone
    from engine.optim import lr_lambda, make_optimizer

    cfg = parse_args(argv, prog="python -m bench.checkpoint_size", description=__doc__.splitlines()[0])
    num_classes = cfg.model.num_classes or data.num_classes(cfg.data.target, "target")
    init_distributed()
    torch.manual_seed(cfg.seed)
    strategy = adapters.get_strategy(cfg.strategy, cfg.adapter)
    model = apply_strategy(strategy, build_backbone(dataclasses.replace(cfg.model, pretrained=False)), num_classes,
                           cfg.train.kernels)
    params = dict(model.named_parameters())
    groups = strategy.param_groups(model)
    optimizer = make_optimizer([[params[n] for n in g] for g in groups], cfg.train)
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
        total = sum(p.stat().st_size for p in files)
        for p in files:
            print(f"{p.stat().st_size / 2**20:10.3f} MB  {p.relative_to(path)}")
    backbone = sum(p.numel() * p.element_size() for n, p in params.items() if n not in set(trainable))
    print(f"{total / 2**20:10.3f} MB  full checkpoint: {cfg.strategy} on {cfg.model.name}, ZeRO {cfg.train.zero_stage}, "
          f"{len(trainable)} trainable tensors ({sum(params[n].numel() for n in trainable):,} parameters); "
          f"the frozen weights left out are {backbone / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
