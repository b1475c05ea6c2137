"""Processes and DeepSpeed: one CPU process up to N GPUs with the same code.

`deepspeed.initialize` gets a concrete config generated from ours (never "auto"), with a user's
DeepSpeed JSON (`train.deepspeed_config`) merged over it: theirs wins, and each key of ours that it
contradicts is reported. A plain single process needs no launcher; `torchrun` or the `deepspeed`
launcher set RANK / WORLD_SIZE. `sum_over_ranks` and `gather_rows` combine what sharded evaluation
computed on each rank (identities in a single process).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import socket
from pathlib import Path

import torch
from torch import nn

from .dotted import flatten
from .errors import UserError

ZERO_STAGES = (0, 1, 2, 3)
# What a launcher (torchrun, deepspeed) tells each rank. A process that starts single runs of its own
# (a sweep, a bench) leaves these out of their environment: after an in-process run it holds a store
# on its MASTER_PORT, which the child would fail to bind.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_distributed(verbose: bool = False) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed; returns (rank, world size). DeepSpeed's own log
    lines (its accelerator, its optimiser notes, the build of its CPU all-reduce) are shown only
    when `verbose`, and on rank 0."""
    show = verbose and int(os.environ.get("RANK", "0")) == 0
    _show_deepspeed_log(show)
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:  # no launcher: a port no other run on this machine holds
        os.environ["MASTER_PORT"] = str(_free_port())
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce when it starts its
    # communication backend (about a minute on first use, and it needs a compiler); only
    # `inference_all_reduce` (tensor-parallel inference) uses it, while training's all-reduce and
    # ZeRO's collectives go through torch.distributed, so it is never built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # it prints (not logs) a line when it has built its shared-memory all-reduce
        with contextlib.nullcontext() if show else contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _show_deepspeed_log(show: bool) -> None:
    """DeepSpeed logs to its "DeepSpeed" logger from its import on; a filter set on that logger before
    the import keeps all but its errors out of the user's output (or lets them all through again)."""
    for name in ("DeepSpeed", "torch.utils.cpp_extension"):  # the latter: notes while DeepSpeed builds its ops
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _ErrorsOnly)]:
            logger.removeFilter(f)
        if not show:
            logger.addFilter(_ErrorsOnly())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def micro_batch(batch_size: int, grad_accum: int, world: int) -> int:
    """Images per rank per forward: the global batch is micro x accumulation x ranks."""
    micro, rest = divmod(batch_size, grad_accum * world)
    if micro == 0 or rest:
        raise UserError(f"batch size {batch_size} must be a multiple of grad_accum ({grad_accum}) x ranks ({world})")
    return micro


def deepspeed_config(cfg, world: int) -> dict:
    """The concrete DeepSpeed config for a TrainConfig `cfg`: ours, and the user's JSON over it."""
    ours = _our_deepspeed_config(cfg, world)
    if not cfg.deepspeed_config:
        return ours
    return _merged(ours, read_deepspeed_config(cfg.deepspeed_config))


def _our_deepspeed_config(cfg, world: int) -> dict:
    config = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch(cfg.batch_size, cfg.grad_accum, world),
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": zero_stage_run(cfg, world)},
        "zero_allow_untested_optimizer": True,   # SGD is fine under ZeRO; DeepSpeed only vets Adam-likes
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # always written: left out, DeepSpeed clips at its default of 1.0 (0.0 turns it off)
    config["gradient_clipping"] = cfg.grad_clip or 0.0
    return config


def zero_stage_run(cfg, world: int) -> int:
    """The ZeRO stage DeepSpeed runs for the TrainConfig `cfg` on `world` ranks. On one process ZeRO 1
    and 2 have nothing to shard and run as stage 0: the same arithmetic without ZeRO's flat fp32
    copies, per-parameter gradient hooks and host read of the overflow flag, which cost a ViT-S full
    fine-tuning step on a CPU 10-40% (bench.engine_overhead, bench.strategies). Stage 3 keeps its
    gathering on one process, and a user's DeepSpeed JSON that has a zero_optimization section (CPU
    offload, say) runs as it says."""
    if world == 1 and cfg.zero_stage in (1, 2) and not (
            cfg.deepspeed_config and "zero_optimization" in read_deepspeed_config(cfg.deepspeed_config)):
        return 0
    return cfg.zero_stage


def read_deepspeed_config(path: str | Path) -> dict:
    """A user's DeepSpeed JSON; UserError if it is missing, not JSON, not a mapping, or holds "auto"."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object, got {type(config).__name__}")
    auto = [key for key, value in flatten(config).items() if value == "auto"]
    if auto:
        raise UserError(f"DeepSpeed config {path}: {auto[0]} is \"auto\", which only the HF Trainer resolves; "
                        f"give a number, or leave the key out and ours is used")
    return config


def adopt_deepspeed_config(cfg, world: int) -> tuple[object, list[str]]:
    """The TrainConfig `cfg` with what the user's DeepSpeed JSON says about the keys ours derives from
    it (batch geometry, ZeRO stage, clipping: theirs wins, so the loaders follow it), and one line
    per key of our generated config that theirs contradicts."""
    path = cfg.deepspeed_config
    if not path:
        return cfg, []
    theirs = read_deepspeed_config(path)
    ours = _our_deepspeed_config(cfg, world)
    flat_ours, flat_theirs = flatten(ours), flatten(theirs)
    notes = [f"DeepSpeed config {path} sets {key} = {json.dumps(flat_theirs[key])} over ours "
             f"({json.dumps(flat_ours[key])})" for key in flat_ours
             if key in flat_theirs and flat_theirs[key] != flat_ours[key]]
    grad_accum = int(theirs.get("gradient_accumulation_steps", cfg.grad_accum))
    if "train_batch_size" in theirs:
        batch = int(theirs["train_batch_size"])
    elif "train_micro_batch_size_per_gpu" in theirs:
        batch = int(theirs["train_micro_batch_size_per_gpu"]) * grad_accum * world
    else:
        batch = cfg.batch_size
    micro = micro_batch(batch, grad_accum, world)
    if int(theirs.get("train_micro_batch_size_per_gpu", micro)) != micro:
        raise UserError(f"DeepSpeed config {path}: train_batch_size {batch} is not train_micro_batch_size_per_gpu "
                        f"{theirs['train_micro_batch_size_per_gpu']} x gradient_accumulation_steps {grad_accum} x "
                        f"{world} rank(s)")
    stage = int(theirs.get("zero_optimization", {}).get("stage", cfg.zero_stage))
    if stage not in ZERO_STAGES:
        raise UserError(f"DeepSpeed config {path}: zero_optimization.stage must be one of {ZERO_STAGES}, got {stage}")
    clip = theirs.get("gradient_clipping", cfg.grad_clip)
    return dataclasses.replace(cfg, batch_size=batch, grad_accum=grad_accum, zero_stage=stage,
                               grad_clip=float(clip) if clip else None), notes


def _merged(ours: dict, theirs: dict) -> dict:
    """`theirs` deep-merged over `ours`: a section both have is merged key by key."""
    merged = dict(ours)
    for key, value in theirs.items():
        merged[key] = _merged(ours[key], value) if isinstance(value, dict) and isinstance(ours.get(key), dict) else value
    return merged


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of `values` over all ranks (float64: counts stay exact to 2**53)."""
    if world_size() == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(total)
    return total.tolist()


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows` (any number of them, the same trailing shape) concatenated in rank order,
    on every rank, on `rows`' device."""
    world = world_size()
    if world == 1:
        return rows
    device = _collective_device()
    counts = [int(n) for n in _gather_counts(len(rows), device)]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=device)  # all_gather: equal sizes
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(rows.device)


def _gather_counts(count: int, device: torch.device) -> torch.Tensor:
    parts = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(world_size())]
    torch.distributed.all_gather(parts, torch.tensor(count, dtype=torch.int64, device=device))
    return torch.stack(parts)


def gathered(model: nn.Module, zero_stage: int):
    """Outside a forward, ZeRO-3 parameters are partitioned: gather them (read-only) for host code."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def register_container_parameters(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters only around that module's own forward. Parameters held
    in a ParameterDict/ParameterList child (LoRA's A, B and gate scores) are used by the parent's
    forward instead, so they are registered as the parent's external parameters."""
    import deepspeed

    for module in model.modules():
        for child in module.children():
            if isinstance(child, (nn.ParameterDict, nn.ParameterList)):
                for p in child.parameters():
                    deepspeed.zero.register_external_parameter(module, p)
