"""Scaling out on this machine: ZeRO 0-3 and plain DDP side by side on 2 ranks, and the source
k-NN measurement on 1 rank against 2.

    python -m bench.scale_out                     # both tables, 3 rounds
    python -m bench.scale_out --only zero --rounds 2 --steps 20
    python -m bench.scale_out --quick             # 1 round of 5 steps; prints only (add --save to write)

Each configuration is its own launch (torchrun for 2 ranks), so each rank's peak resident memory
is that configuration's; configurations take turns round after round (A B C ... A B C) and the
tables give medians over rounds. Every rank runs one intra-op thread, standing in for one device.

- step: the embedded default model (lora or full), micro-batch 16 per rank of random images, SGD;
  DeepSpeed with our generated config (`engine.distributed.deepspeed_config`) for ZeRO 0-3, and
  `torch.nn.parallel.DistributedDataParallel` with the same model, optimiser and data for DDP. A
  step's time is the slower rank's; a round's, the median of `--steps` steps after warm-up.
- k-NN: `engine.run.measure_source` (extraction of the bank and the queries, sharded over the
  ranks, then the k-NN) on the whole embedded source domain (5,000 bank images, 1,000 queries).

Results: `bench/results/scale-out-zero-<device>` and `scale-out-knn-<device>` (.csv and .json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .processes import finish
from .report import add_output_options, format_table, parse_args, save_or_skip

ENGINES = ("zero0", "zero1", "zero2", "zero3", "ddp")
STRATEGIES = ("lora", "full")
_RESULT = "RESULT "


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale_out", description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("zero", "knn"), help="one table only")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per launch (after 5 warm-up steps)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="1 round of 5 timed steps")
    add_output_options(p, quick=True)
    p.add_argument("--worker", choices=("step", "knn"), help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="lora", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="zero2", help=argparse.SUPPRESS)
    args = parse_args(p, argv)
    if args.quick:
        args.rounds, args.steps = 1, 5
    if args.worker == "step":
        return _step_worker(args.strategy, args.engine, args.steps, args.micro_batch)
    if args.worker == "knn":
        return _knn_worker()
    if args.only != "knn":
        _zero_table(args)
    if args.only != "zero":
        _knn_table(args)
    return 0


def _launch(worker_args: list[str], ranks: int) -> list[dict]:
    """One launch of a worker; the RESULT lines of every rank."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        code = finish(worker_args, ranks, log, module="bench.scale_out")
        text = log.read_text()
    if code:
        raise RuntimeError(f"{' '.join(worker_args)} on {ranks} rank(s) failed:\n" + "\n".join(text.splitlines()[-20:]))
    # the ranks share one log, so one rank's line may land in the middle of another's
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(chunk)[0] for chunk in text.split(_RESULT)[1:]]


def _zero_table(args) -> None:
    configs = [(s, e) for s in STRATEGIES for e in ENGINES]
    rounds = {c: [] for c in configs}
    for r in range(args.rounds):
        for strategy, engine in configs:
            ranks = _launch(["--worker", "step", "--strategy", strategy, "--engine", engine, "--steps",
                             str(args.steps), "--micro-batch", str(args.micro_batch)], 2)
            rounds[(strategy, engine)].append(ranks)
            print(f"round {r + 1}: {strategy} {engine}: {max(x['step_ms'] for x in ranks):.1f} ms", flush=True)
    rows = []
    for strategy in STRATEGIES:
        ddp = statistics.median(max(x["step_ms"] for x in r) for r in rounds[(strategy, "ddp")])
        for engine in ENGINES:
            runs = rounds[(strategy, engine)]
            step = statistics.median(max(x["step_ms"] for x in r) for r in runs)
            row = {"strategy": strategy, "engine": engine, "step_ms": step, "vs_ddp": step / ddp}
            for key in ("peak_mb", "added_mb"):
                for k in (0, 1):
                    row[f"{key}_rank{k}"] = statistics.median(next(x[key] for x in r if x["rank"] == k) for r in runs)
            rows.append(row)
    print(f"\n2 ranks (gloo, 1 thread each), micro-batch {args.micro_batch} per rank, {args.steps} timed steps, "
          f"median of {args.rounds} round(s); peak RSS per rank, and of it what came after the model was built\n")
    print(format_table(rows, rows[0].keys(), markdown=args.markdown,
                       formats={"step_ms": ".1f", "vs_ddp": ".3f", **{k: ".0f" for k in rows[0] if "_mb_" in k}}))
    save_or_skip(args, "scale-out-zero", rows, meta={"ranks": 2, "micro_batch": args.micro_batch,
                                                     "steps": args.steps, "rounds": args.rounds})


def _knn_table(args) -> None:
    times = {1: [], 2: []}
    accuracy = {}
    for r in range(args.rounds):
        for ranks in (1, 2):
            out = next(x for x in _launch(["--worker", "knn"], ranks) if x["rank"] == 0)
            times[ranks].append(out["seconds"])
            accuracy[ranks] = out["knn"]
            print(f"round {r + 1}: {ranks} rank(s): {out['seconds']:.1f} s", flush=True)
    seconds = {n: statistics.median(times[n]) for n in (1, 2)}
    rows = [{"ranks": n, "seconds": seconds[n], "speed_up": seconds[1] / seconds[n], "knn20_pct": accuracy[n]["20"]}
            for n in (1, 2)]
    print(f"\nsource k-NN measurement ({out['bank']} bank, {out['queries']} queries; 1 thread per rank), "
          f"median of {args.rounds} round(s)\n")
    print(format_table(rows, rows[0].keys(), markdown=args.markdown,
                       formats={"seconds": ".1f", "speed_up": ".2f", "knn20_pct": ".2f"}))
    save_or_skip(args, "scale-out-knn", rows, meta={"bank": out["bank"], "queries": out["queries"],
                                                    "rounds": args.rounds})


def _step_worker(strategy_name: str, engine_name: str, steps: int, micro: int) -> int:
    import resource

    import deepspeed
    import torch
    import torch.nn.functional as F

    import adapters
    from engine.config import ModelConfig, TrainConfig
    from engine.distributed import deepspeed_config, init_distributed, register_container_parameters
    from engine.models import apply_strategy, build_backbone
    from engine.optim import make_optimizer

    rank, world = init_distributed()
    baseline = _resident_mb()  # the process before the model: Python, torch, DeepSpeed
    torch.manual_seed(0)
    strategy = adapters.get_strategy(strategy_name, adapters.AdapterConfig())
    model = apply_strategy(strategy, build_backbone(ModelConfig()), 10, "auto")
    cfg = TrainConfig(batch_size=micro * world, zero_stage=int(engine_name[-1]) if engine_name != "ddp" else 0)
    optimizer = make_optimizer(model, cfg, [g for g in strategy.param_groups(model) if g])
    x, y = torch.randn(micro, 3, 32, 32), torch.randint(0, 10, (micro,))     # (B, 3, 32, 32), (B,)
    if engine_name == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)

        def step() -> None:
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
        if cfg.zero_stage == 3:
            register_container_parameters(engine.module)

        def step() -> None:
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()
    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        torch.distributed.barrier()
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(_RESULT + json.dumps({"rank": rank, "step_ms": 1000 * statistics.median(times), "peak_mb": peak,
                                "added_mb": peak - baseline}), flush=True)
    return 0


def _resident_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _knn_worker() -> int:
    import torch

    from engine import data
    from engine.config import RunConfig
    from engine.distributed import init_distributed
    from engine.models import build_backbone
    from engine.run import Loaders, Runtime, measure_source

    rank, world = init_distributed()
    cfg = RunConfig()
    source = data.load_domain(cfg.data.source, role="source")
    bank, queries = source.train, source.test
    rt = Runtime(rank, world, torch.device("cpu"))
    model = build_backbone(cfg.model)
    pre = data.Preprocess.from_model(model)

    def loader(split):
        return data.make_loader(split, pre, train=False, batch_size=cfg.eval.batch_size, rank=rank, world=world)

    loaders = Loaders(None, None, None, knn_bank=loader(bank), knn_query=loader(queries))
    torch.distributed.barrier()
    began = time.perf_counter()
    accuracy = measure_source(model, loaders, cfg, source.num_classes, rt)
    torch.distributed.barrier()
    print(_RESULT + json.dumps({"rank": rank, "seconds": time.perf_counter() - began, "knn": accuracy,
                                "bank": len(bank), "queries": len(queries)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
