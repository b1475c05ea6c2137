"""The engine's train step against a plain torch loop, and compiled against eager, side by side.

    python -m bench.engine_overhead                 # full and lora on the embedded default
    python -m bench.engine_overhead --quick         # fewer rounds; prints only
    python -m bench.engine_overhead --strategies full -- --batch-size 64 model.name=vit_small_patch16_224 model.pretrained=false

Providers, per strategy, on one fixed batch of random images (no data loading):
- `plain`: the same model in a plain torch loop, the same optimiser and schedule (engine.optim),
  no DeepSpeed: zero_grad, forward, cross-entropy, backward, step;
- `engine`: `engine.train.optimiser_step`, the loop's own step, on `engine.train.make_engine`;
- `engine-compiled`: the same with `train.compile` (torch.compile, inductor).
They take turns round after round (A B C A B C ..., the order rotating), each round `--steps`
optimiser steps; the table gives each provider's best round and the ratios of the best rounds
(median of the per-round ratios beside them): engine / plain (1.0: no overhead) and compiled /
eager (above 1: compile is faster).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import adapters
from engine.config import parse_args as parse_run_args
from engine.distributed import init_distributed
from engine.metrics import sync
from engine.models import apply_strategy, build_backbone
from engine.optim import lr_lambda, make_optimizer
from engine.train import _DeviceLoss, make_engine, optimiser_step

from .device import device_name
from .report import add_output_options, format_table, parse_args, save_or_skip
from .timing import CLOCKS

PROVIDERS = ("plain", "engine", "engine-compiled")
TABLE_COLUMNS = ("strategy", "provider", "img_per_s", "best_ms_per_step", "vs", "ratio", "ratio_median")


def _model(cfg, strategy_name: str, num_classes: int):
    torch.manual_seed(cfg.seed)
    strategy = adapters.get_strategy(strategy_name, cfg.adapter)
    model = apply_strategy(strategy, build_backbone(cfg.model), num_classes, cfg.train.kernels)
    return model, strategy


def _stop_groups(model, strategy):
    return [g for g in strategy.param_groups(model) if g]


def plain_step(model, strategy, train_cfg, batch):
    """A plain torch loop's step over `model` (its own copy), engine.optim's optimiser and schedule, clipping as
    train.grad_clip says."""
    optimizer = make_optimizer(model, train_cfg, _stop_groups(model, strategy))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg))
    images, labels = batch
    model.train()

    trainable = [p for p in model.parameters() if p.requires_grad]

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        if train_cfg.grad_clip:  # the engine clips too (train.grad_clip, 1.0 by default): the same work
            torch.nn.utils.clip_grad_norm_(trainable, train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
    return step


def engine_step(model, strategy, train_cfg, batch, device):
    """The engine's own step (engine.train.optimiser_step) on its own DeepSpeed engine."""
    engine, *_ = make_engine(model, train_cfg, _stop_groups(model, strategy))
    losses = _DeviceLoss(device)
    counter = {"step": 0}

    def step():
        counter["step"] += 1
        optimiser_step(engine, strategy, lambda: batch, train_cfg, device, counter["step"], losses)
    return step


def interleaved(fns: dict, rounds: int, steps: int, device, clock=time.perf_counter) -> dict:
    """Seconds per round of `steps` calls of each fn by `clock`, the fns taking turns in a rotating order."""
    for fn in fns.values():  # warm-up (and the compile)
        fn()
        fn()
    sync(device)
    order, times = list(fns), {name: [] for name in fns}
    for i in range(rounds):
        for name in order[i % len(order):] + order[:i % len(order)]:
            t0 = clock()
            for _ in range(steps):
                fns[name]()
            sync(device)
            times[name].append(clock() - t0)
    return times


def _ratio(times: dict, slow: str, fast: str) -> tuple[float, float]:
    """(best round of `slow` / best round of `fast`, median of the per-round ratios)."""
    return (min(times[slow]) / min(times[fast]),
            statistics.median(a / b for a, b in zip(times[slow], times[fast])))


# (provider, against): engine / plain is the engine's overhead (1.0: none); eager / compiled is the speedup
RATIOS = {"engine": ("plain", "time engine / plain"), "engine-compiled": ("engine", "speedup compiled over eager")}


def rows_for(strategy: str, times: dict, steps: int, batch_size: int) -> list[dict]:
    rows = []
    for name, t in times.items():
        row = {"strategy": strategy, "provider": name, "img_per_s": steps * batch_size / min(t),
               "best_ms_per_step": 1000 * min(t) / steps}
        if name in RATIOS and RATIOS[name][0] in times:
            against, _ = RATIOS[name]
            slow, fast = (name, against) if name == "engine" else (against, name)
            row["vs"] = against
            row["ratio"], row["ratio_median"] = _ratio(times, slow, fast)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="full,lora", help="comma list (default: full,lora)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    p.add_argument("--rounds", type=int, help="rounds per provider (default 15, quick 5)")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per round (default 3)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="wall time, or the process's CPU time (steadier on a busy machine; with --threads 1)")
    p.add_argument("--classes", type=int, default=10, help="classes of the new head (default 10)")
    p.add_argument("--quick", action="store_true", help="5 rounds; prints only unless --save")
    add_output_options(p, quick=True)
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: engine.run options (model, batch, train.*)")
    args = parse_args(p, argv)
    strategies, providers = args.strategies.split(","), args.providers.split(",")
    bad = [s for s in strategies if s not in adapters.STRATEGIES] + [q for q in providers if q not in PROVIDERS]
    if bad:
        p.error(f"unknown strategy or provider {bad[0]!r}")
    cfg = parse_run_args([a for a in args.run_args if a != "--"])
    rounds = args.rounds or (5 if args.quick else 15)
    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    size = build_backbone(cfg.model).patch_embed.img_size
    generator = torch.Generator().manual_seed(cfg.seed)
    batch = (torch.randn(cfg.train.batch_size, 3, *size, generator=generator).to(device),
             torch.randint(0, args.classes, (cfg.train.batch_size,), generator=generator).to(device))
    rows = []
    for strategy_name in strategies:
        model, strategy = _model(cfg, strategy_name, args.classes)
        model = model.to(device)
        fns = {}
        for name in providers:
            copy_model = copy.deepcopy(model)
            if name == "plain":
                fns[name] = plain_step(copy_model, strategy, cfg.train, batch)
            else:
                train_cfg = dataclasses.replace(cfg.train, compile=name == "engine-compiled")
                fns[name] = engine_step(copy_model, strategy, train_cfg, batch, device)
        print(f"{strategy_name}: {rounds} rounds of {args.steps} steps, batch {cfg.train.batch_size}, "
              f"{', '.join(fns)} taking turns ...", flush=True)
        rows += rows_for(strategy_name, interleaved(fns, rounds, args.steps, device, CLOCKS[args.clock]), args.steps, cfg.train.batch_size)
    for row in rows:
        row.update(device=device_name(), clock=args.clock, threads=torch.get_num_threads())
    print(format_table(rows, TABLE_COLUMNS, formats={"ratio": ".3f", "ratio_median": ".3f", "img_per_s": ".1f",
                                                      "best_ms_per_step": ".2f"}, markdown=args.markdown))
    print("ratio: engine rows, engine time / plain time (1.0: no overhead); engine-compiled rows, eager time / "
          "compiled time (above 1: compiling is faster); best rounds (median of the per-round ratios)")
    save_or_skip(args, "engine-overhead", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
