"""Per-device training memory of a run, and the largest micro-batch that fits.

    python -m bench.memory --model vit_base_patch16_224 --strategy lora --device-memory 80GB --world 8 --zero-stage 2
    python -m bench.memory --model vit_large_patch16_224 --optimizer adamw --precision bf16 --plot memory.png
    python -m bench.memory --check --model vit_tiny_patch16_224,vit_small_patch16_224 --batches 2,8
    python -m bench.memory --checkpointing --model vit_base_patch16_224 --strategy full --micro-batch 16

The model, per device, for the engine's runs (fp32 weights, autocast, DeepSpeed ZeRO stage s on
W ranks; e = 4 bytes; P_f frozen and P_t trainable parameters, counted on the meta device):
  weights             e (P_f + P_t), / W under ZeRO-3 (parameters under DeepSpeed's persistence
                      threshold stay whole), plus two blocks gathered at a time under ZeRO-3
  master copy         e P_t / W under ZeRO-1/2 (DeepSpeed's fp32 partition that the optimiser steps)
  optimiser state     o P_t, / W under ZeRO >= 1; o = bytes of state per element, measured by
                      stepping the optimiser on a probe tensor
  gradients           e P_t, / W from ZeRO-2; made during backward (ZeRO-3: a buffer made at start)
  reduce bucket       DeepSpeed's reduce_bucket_size (5e8 fp32 elements, 1.86 GiB) under ZeRO >= 1
                      on a GPU; on a CPU its untouched pages are not resident, so 0
  activations         A = bytes autograd keeps for backward at the end of the forward (with
                      checkpointing: the block inputs), measured on the real model at batch 1
                      and 2 on this CPU (saved-tensor hooks, as bench.strategy_memory counts them,
                      but only the tensors still alive at the end of the forward)
  backward            backward frees activations as it makes gradients: max(A, gradients), plus
                      with checkpointing one block's recompute (what that block saves), plus one
                      block's working set (what a trained block saves, in any strategy: the
                      forward's intermediates of the block being run)
  overhead            a stated constant: CUDA context, cuBLAS/cuDNN workspaces and allocator
                      fragmentation, 1.5 GiB on a GPU (an estimate: not measured, this machine
                      has none); on this CPU 27 MiB fitted (the mean residual of the ViT-Ti rows
                      of `--check`: what the first train steps load), plus 48 MiB under ZeRO >= 1
                      (DeepSpeed's ZeRO optimiser wrapper, measured)
Peak = the persistent terms + the backward term. Activations follow the micro-batch, everything
else does not, so the largest micro-batch that fits solves one piecewise-linear inequality.

`--check` measures the peak on this CPU: each configuration in a child process, the peak resident
set over model build, DeepSpeed initialisation and two train steps (the second backward also holds
the optimiser state) above the resident set before the model existed, with glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_) so that a freed tensor leaves the resident set (as live
bytes leave torch.cuda.max_memory_allocated).

`--checkpointing` puts the two sides of activation checkpointing next to each other on one model:
the bytes saved for backward with it off and on, and train-step times taking turns (A B A B).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import torch

from .report import add_output_options, format_table, parse_args, save_or_skip
from .step_measures import rss_kib

FP32 = 4
REDUCE_BUCKET_ELEMENTS = 5e8       # DeepSpeed's reduce_bucket_size default (engine.distributed leaves it)
ZERO3_PERSISTENCE_ELEMENTS = 1e5   # DeepSpeed's stage3_param_persistence_threshold default
OVERHEAD_BYTES = {"cuda": 1.5 * 2**30, "cpu": 27 * 2**20}
CPU_ZERO_BYTES = 48 * 2**20        # on the CPU, added under ZeRO >= 1


# -- what the model is made of -------------------------------------------------------------------------

def build_model(model_name: str, strategy: str, num_classes: int, device="cpu"):
    """timm's `model_name` with `strategy` (AdapterConfig's defaults) applied; random weights."""
    import timm

    import adapters
    from adapters import AdapterConfig

    with torch.device(device):
        backbone = timm.create_model(model_name, pretrained=False, num_classes=0)
    return adapters.get_strategy(strategy, AdapterConfig()).apply(backbone, num_classes)


@dataclasses.dataclass
class Parameters:
    frozen: int
    trainable: int
    persistent: int      # parameters ZeRO-3 keeps whole on every rank (below its persistence threshold)
    largest_block: int   # parameters of the largest transformer block


def count_parameters(model) -> Parameters:
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return Parameters(frozen=sum(p.numel() for p in params) - trainable, trainable=trainable,
                      persistent=sum(p.numel() for p in params if p.numel() <= ZERO3_PERSISTENCE_ELEMENTS),
                      largest_block=max(sum(p.numel() for p in b.parameters()) for b in model.blocks))


def optimizer_state_bytes(name: str) -> float:
    """Bytes of optimiser state per trainable element: two steps on a (64, 48) probe, state counted."""
    from engine.config import TrainConfig
    from engine.optim import make_optimizer

    probe = torch.nn.Linear(48, 64, bias=False)
    opt = make_optimizer(probe, TrainConfig(optimizer=name))
    for _ in range(2):
        probe.weight.grad = torch.randn_like(probe.weight)
        opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    return sum(t.numel() * t.element_size() for t in state) / probe.weight.numel()


def saved_activations(model, batch: int, precision: str) -> tuple[int, int]:
    """(bytes autograd holds for backward at the end of a forward of `batch` images, the most any
    one block holds): unique storages, parameters excluded, only tensors still alive."""
    from engine.precision import PRECISIONS, autocast

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current, packed = [None], []
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, out: current.__setitem__(0, None)))

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            packed.append((current[0], weakref.ref(t)))
        return t

    size = model.patch_embed.img_size
    x = torch.randn(batch, 3, *size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(x.device, PRECISIONS[precision]):
        out = model(x)
    gc.collect()  # checkpoint frames of frozen blocks hold their inputs in reference cycles
    seen, per_block = set(), {}
    for block, ref in packed:
        t = ref()
        if t is None or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        per_block[block] = per_block.get(block, 0) + t.untyped_storage().nbytes()
    del out
    for h in hooks:
        h.remove()
    return sum(per_block.values()), max([v for k, v in per_block.items() if k is not None], default=0)


@dataclasses.dataclass
class Activations:
    """Bytes per sample (and at batch 0) of what the forward leaves for backward."""
    per_sample: float
    fixed: float
    block_per_sample: float            # the largest block's share
    checkpointed_per_sample: float
    checkpointed_fixed: float
    working_block_per_sample: float    # one trained block's saved bytes: a forward's working set

    def saved(self, batch: int, checkpointing: bool) -> float:
        if checkpointing:
            return self.checkpointed_fixed + self.checkpointed_per_sample * batch
        return self.fixed + self.per_sample * batch


def calibrate(model_name: str, strategy: str, precision: str = "fp32", num_classes: int = 100) -> Activations:
    """Activations per sample from real forwards at batch 1 and 2 on this CPU."""
    def at(name, checkpointing):
        torch.manual_seed(0)
        model = build_model(model_name, name, num_classes).train()
        model.set_grad_checkpointing(checkpointing)
        return [saved_activations(model, b, precision) for b in (1, 2)]

    (s1, b1), (s2, b2) = at(strategy, False)
    (c1, _), (c2, _) = at(strategy, True)
    (_, w1), (_, w2) = at("full", False) if strategy != "full" else ((s1, b1), (s2, b2))
    return Activations(per_sample=s2 - s1, fixed=max(0, 2 * s1 - s2), block_per_sample=b2 - b1,
                       checkpointed_per_sample=c2 - c1, checkpointed_fixed=max(0, 2 * c1 - c2),
                       working_block_per_sample=w2 - w1)


# -- the prediction -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """One device's memory terms, bytes; `at(batch)` adds the activations."""
    params: Parameters
    activations: Activations
    checkpointing: bool
    weights: float
    master: float
    optimizer: float
    gradients: float
    gradients_made_in_backward: bool
    bucket: float
    overhead: float

    @property
    def persistent(self) -> float:
        grads = 0 if self.gradients_made_in_backward else self.gradients
        return self.weights + self.master + self.optimizer + grads + self.bucket + self.overhead

    def backward(self, batch: int) -> float:
        act = self.activations
        grads = self.gradients if self.gradients_made_in_backward else 0
        recompute = act.block_per_sample * batch if self.checkpointing else 0
        return max(act.saved(batch, self.checkpointing), grads) + recompute + act.working_block_per_sample * batch

    def at(self, batch: int) -> float:
        return self.persistent + self.backward(batch)

    def largest_batch(self, device_bytes: float) -> int:
        """The largest micro-batch with at(batch) <= device_bytes (0: not even one image)."""
        if self.at(1) > device_bytes:
            return 0
        low, high = 1, 2
        while self.at(high) <= device_bytes and high < 2**24:
            low, high = high, high * 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.at(mid) <= device_bytes else (low, mid)
        return low


def plan(params: Parameters, activations: Activations, optimizer_bytes: float, zero_stage: int, world: int,
         checkpointing: bool, device: str = "cuda") -> Plan:
    """The terms of the module docstring for one device of `world` under ZeRO `zero_stage` (the stage
    DeepSpeed runs: one process runs 1 and 2 as 0, `engine.distributed.zero_stage_run`)."""
    from engine.config import TrainConfig
    from engine.distributed import zero_stage_run

    zero_stage = zero_stage_run(TrainConfig(zero_stage=zero_stage), world)
    total = params.frozen + params.trainable
    if zero_stage == 3:
        whole = params.persistent
        weights = FP32 * (whole + (total - whole) / world + 2 * params.largest_block)
    else:
        weights = FP32 * total
    return Plan(params=params, activations=activations, checkpointing=checkpointing, weights=weights,
                master=FP32 * params.trainable / world if zero_stage in (1, 2) else 0,
                optimizer=optimizer_bytes * params.trainable / (world if zero_stage >= 1 else 1),
                gradients=FP32 * params.trainable / (world if zero_stage >= 2 else 1),
                gradients_made_in_backward=zero_stage < 3,
                bucket=FP32 * REDUCE_BUCKET_ELEMENTS if zero_stage >= 1 and device == "cuda" else 0,
                overhead=OVERHEAD_BYTES[device] + (CPU_ZERO_BYTES if device == "cpu" and zero_stage >= 1 else 0))


# -- the measurement (this CPU) ------------------------------------------------------------------------

def measure_peaks(configs: list[dict], steps: int = 2) -> list[float]:
    """In this process (started with a fixed mmap threshold): per config, the peak resident bytes of
    build + DeepSpeed init + `steps` train steps above the resident set before, on one rank."""
    import deepspeed
    import torch.nn.functional as F

    from engine.config import TrainConfig
    from engine.distributed import deepspeed_config, init_distributed, register_container_parameters
    from engine.optim import make_optimizer
    from engine.precision import PRECISIONS, autocast

    init_distributed()
    peaks = []
    for c in configs:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from the current one
        before = 1024 * rss_kib("VmRSS")
        torch.manual_seed(0)
        model = build_model(c["model"], c["strategy"], c["num_classes"]).train()
        model.set_grad_checkpointing(c["checkpointing"])
        cfg = TrainConfig(batch_size=c["batch"], zero_stage=c["zero_stage"], optimizer=c["optimizer"])
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg),
                                               config=deepspeed_config(cfg, 1))
        if c["zero_stage"] == 3:
            register_container_parameters(engine.module)
        x = torch.randn(c["batch"], 3, *model.patch_embed.img_size)
        y = torch.randint(0, c["num_classes"], (c["batch"],))
        for _ in range(steps):
            with autocast(x.device, PRECISIONS[c["precision"]]):
                loss = F.cross_entropy(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
        peaks.append(1024 * rss_kib("VmHWM") - before)
        del engine, model, loss
    return peaks


def measure_in_child(configs: list[dict]) -> list[float]:
    from engine.distributed import LAUNCHER_ENV

    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "bench.memory", "--measure", json.dumps(configs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_rows(configs: list[dict]) -> list[dict]:
    """Predicted (CPU terms, one rank) against the measured peak, per config; each measured in a
    fresh process so that nothing is left over from the last one."""
    rows, cache = [], {}
    for c in configs:
        (peak,) = measure_in_child([c])
        key = (c["model"], c["strategy"], c["precision"])
        if key not in cache:
            model = build_model(c["model"], c["strategy"], c["num_classes"], device="meta")
            cache[key] = count_parameters(model), calibrate(c["model"], c["strategy"], c["precision"], c["num_classes"])
        params, act = cache[key]
        predicted = plan(params, act, optimizer_state_bytes(c["optimizer"]), c["zero_stage"], 1, c["checkpointing"],
                         device="cpu").at(c["batch"])
        rows.append({**{k: c[k] for k in CHECK_KEYS}, "measured_mib": round(peak / 2**20, 1),
                     "predicted_mib": round(predicted / 2**20, 1), "error_pct": round(100 * (predicted - peak) / peak, 1)})
        print(format_table(rows[-1:], rows[-1]).splitlines()[-1], flush=True)
    return rows


CHECK_KEYS = ("model", "strategy", "batch", "zero_stage", "checkpointing", "optimizer")


def check_configs(models: list[str], batches: list[int], strategies: list[str]) -> list[dict]:
    """Every strategy at every batch under ZeRO-2 (stage 0 on this one process) with SGD; with
    checkpointing and without ZeRO (AdamW) at the largest batch for full and lora."""
    base = dict(num_classes=100, optimizer="sgd", precision="fp32", zero_stage=2, checkpointing=False)
    top, configs = max(batches), []
    for m in models:
        configs += [dict(base, model=m, strategy=s, batch=b) for b in batches for s in strategies]
        configs += [dict(base, model=m, strategy=s, batch=top, checkpointing=True) for s in ("full", "lora")
                    if s in strategies]
        configs += [dict(base, model=m, strategy=s, batch=top, zero_stage=0, optimizer="adamw") for s in ("full",)
                    if s in strategies]
    return configs


def summarise(rows: list[dict]) -> list[dict]:
    """The largest error (absolute) per strategy and model."""
    worst: dict = {}
    for r in rows:
        key = (r["model"], r["strategy"])
        worst[key] = max(worst.get(key, 0.0), abs(r["error_pct"]))
    return [{"model": m, "strategy": s, "configs": sum(1 for r in rows if (r["model"], r["strategy"]) == (m, s)),
             "largest_error_pct": e} for (m, s), e in worst.items()]


# -- checkpointing side by side -----------------------------------------------------------------------

def checkpointing_rows(model_name: str, strategy: str, batch: int, rounds: int, num_classes: int = 100) -> list[dict]:
    """One model, train steps (forward, backward, SGD step) with checkpointing off and on taking turns,
    one untimed step each first: saved activations at the end of the forward and the best step time."""
    import time

    import torch.nn.functional as F

    from engine.config import TrainConfig
    from engine.optim import make_optimizer

    torch.manual_seed(0)
    model = build_model(model_name, strategy, num_classes).train()
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd"))
    x = torch.randn(batch, 3, *model.patch_embed.img_size)
    y = torch.randint(0, num_classes, (batch,))

    def step():
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    modes = (False, True)
    saved, times = {}, {m: [] for m in modes}
    for on in modes:
        model.set_grad_checkpointing(on)
        saved[on] = saved_activations(model, batch, "fp32")[0]
        step()
    for _ in range(rounds):
        for on in modes:
            model.set_grad_checkpointing(on)
            t0 = time.perf_counter()
            step()
            times[on].append(time.perf_counter() - t0)
    rows = [{"model": model_name, "strategy": strategy, "batch": batch, "checkpointing": on,
             "saved_activations_mib": round(saved[on] / 2**20, 1), "best_step_s": round(min(times[on]), 3)}
            for on in modes]
    per_round = sorted(b / a for a, b in zip(times[False], times[True]))
    rows.append({"model": model_name, "strategy": strategy, "batch": batch, "checkpointing": "on / off",
                 "saved_activations_mib": round(saved[True] / saved[False], 3),
                 "best_step_s": round(min(times[True]) / min(times[False]), 3),
                 "median_round_ratio": round(per_round[len(per_round) // 2], 3)})
    return rows


# -- the command ---------------------------------------------------------------------------------------

def parse_bytes(text: str) -> float:
    """'80GB' / '80GiB' / '141G' -> bytes (binary units: a GPU's '80GB' is 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 80GB, got {text!r}")
    return float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def plan_rows(args, strategies: list[str]) -> tuple[list[dict], dict]:
    """One row of terms per strategy (GiB per device) and its plans without and with checkpointing."""
    rows, plans = [], {}
    opt_bytes = optimizer_state_bytes(args.optimizer)
    for strategy in strategies:
        meta = build_model(args.model, strategy, args.num_classes, device="meta")
        params = count_parameters(meta)
        act = calibrate(args.model, strategy, args.precision, args.num_classes)
        plain = plan(params, act, opt_bytes, args.zero_stage, args.world, False)
        ckpt = plan(params, act, opt_bytes, args.zero_stage, args.world, True)
        plans[strategy] = plain, ckpt
        gib = 2**30
        row = {"strategy": strategy, "trainable": params.trainable,
               "weights_gib": round(plain.weights / gib, 2), "master_gib": round(plain.master / gib, 2),
               "optimizer_gib": round(plain.optimizer / gib, 2), "gradients_gib": round(plain.gradients / gib, 2),
               "bucket_gib": round(plain.bucket / gib, 2), "overhead_gib": round(plain.overhead / gib, 2),
               "act_mib_per_img": round(act.per_sample / 2**20, 1),
               "act_ckpt_mib_per_img": round(act.checkpointed_per_sample / 2**20, 1),
               "max_micro_batch": plain.largest_batch(args.device_memory),
               "max_micro_batch_ckpt": ckpt.largest_batch(args.device_memory)}
        if args.micro_batch:
            row["total_gib"] = round(plain.at(args.micro_batch) / gib, 2)
            row["total_ckpt_gib"] = round(ckpt.at(args.micro_batch) / gib, 2)
        rows.append(row)
    return rows, plans


def draw(plans: dict, batch: int, device_bytes: float, title: str, path: Path) -> None:
    """Stacked bars per strategy (without / with checkpointing) at `batch`, the device's memory as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ("weights", "master", "optimizer", "gradients", "bucket", "overhead", "activations")
    labels, stacks = [], []
    for strategy, (plain, ckpt) in plans.items():
        for p, tag in ((plain, ""), (ckpt, " +ckpt")):
            grads_outside = p.gradients if not p.gradients_made_in_backward else 0
            values = [p.weights, p.master, p.optimizer, grads_outside, p.bucket, p.overhead, p.backward(batch)]
            labels.append(strategy + tag)
            stacks.append([v / 2**30 for v in values])
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4.5))
    bottom = [0.0] * len(labels)
    for j, part in enumerate(parts):
        heights = [s[j] for s in stacks]
        ax.bar(labels, heights, bottom=bottom, label=part if part != "activations" else "activations + backward")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.axhline(device_bytes / 2**30, color="black", linestyle="--", label="device memory")
    ax.set_ylabel("GiB per device")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from engine.distributed import ZERO_STAGES
    from engine.optim import OPTIMIZERS
    from engine.precision import PRECISIONS

    import adapters

    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="a timm ViT name (--check: a comma list)")
    p.add_argument("--strategy", default=",".join(adapters.STRATEGIES), help="comma list (default: all six)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--device-memory", type=parse_bytes, default=parse_bytes("80GB"), help="per device, e.g. 80GB")
    p.add_argument("--world", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--zero-stage", type=int, default=2, choices=ZERO_STAGES)
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, metavar="NAME", help="a timm optimiser name")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--micro-batch", type=int, help="also give the total at this micro-batch (--checkpointing: "
                                                    "the batch, default 16)")
    p.add_argument("--plot", metavar="PNG", help="draw the terms per strategy at --micro-batch (default 32)")
    p.add_argument("--check", action="store_true", help="prediction vs measured peak on this CPU")
    p.add_argument("--batches", default="4,16", help="with --check: comma list of micro-batches")
    p.add_argument("--checkpointing", action="store_true",
                   help="saved activations and step time with checkpointing off and on, side by side")
    p.add_argument("--rounds", type=int, default=3, help="with --checkpointing: timed steps per mode")
    p.add_argument("--quick", action="store_true", help="with --check or --checkpointing: print only")
    add_output_options(p, quick=True)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # child process: measure these configs, print JSON
    args = parse_args(p, argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if args.measure:
        print(json.dumps(measure_peaks(json.loads(args.measure))))
        return 0
    strategies = args.strategy.split(",")
    unknown = [s for s in strategies if s not in adapters.STRATEGIES]
    if unknown:
        p.error(f"unknown strategy {unknown[0]!r}; choose from {', '.join(adapters.STRATEGIES)}")
    if args.world < 1 or (args.micro_batch is not None and args.micro_batch < 1):
        p.error("--world and --micro-batch must be positive")
    if args.check:
        batches = [int(b) for b in args.batches.split(",")]
        rows = check_rows(check_configs(args.model.split(","), batches, strategies))
        summary = summarise(rows)
        print("\n" + format_table(rows, rows[0], markdown=args.markdown))
        print("\n" + format_table(summary, summary[0], markdown=args.markdown))
        save_or_skip(args, "memory-check", rows, tag="-" + "+".join(m.split("_")[1] for m in args.model.split(",")))
        return 0
    if args.checkpointing:
        rows = []
        for strategy in strategies:
            rows += checkpointing_rows(args.model, strategy, args.micro_batch or 16, args.rounds, args.num_classes)
            print(format_table(rows[-3:], rows[-1]), flush=True)
        print("\n" + format_table(rows, rows[-1], markdown=args.markdown))
        save_or_skip(args, "memory-checkpointing", rows)
        return 0
    rows, plans = plan_rows(args, strategies)
    print(f"{args.model}, {args.world} rank(s), ZeRO-{args.zero_stage}, {args.optimizer}, {args.precision}, "
          f"{args.device_memory / 2**30:g} GiB per device")
    print(format_table(rows, rows[0], markdown=args.markdown))
    if args.plot:
        batch = args.micro_batch or 32
        draw(plans, batch, args.device_memory, f"{args.model}, micro-batch {batch}, {args.world} ranks, "
             f"ZeRO-{args.zero_stage}, {args.optimizer}, {args.precision}", Path(args.plot))
        print(f"drawn: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
