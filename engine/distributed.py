"""Processes and DeepSpeed: one CPU process up to N GPUs with the same code.

`deepspeed.initialize` gets a concrete config generated from ours (never "auto"). A plain single
process needs no launcher; `torchrun` or the `deepspeed` launcher set RANK / WORLD_SIZE.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket

import torch
from torch import nn

from .errors import UserError

ZERO_STAGES = (0, 1, 2, 3)


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
    if int(os.environ["WORLD_SIZE"]) == 1:
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce on first use (about a
        # minute here); one process has nothing to reduce, so skip it.
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
    """A concrete DeepSpeed config for a TrainConfig `cfg`."""
    config = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch(cfg.batch_size, cfg.grad_accum, world),
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,   # SGD is fine under ZeRO; DeepSpeed only vets Adam-likes
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip:
        config["gradient_clipping"] = cfg.grad_clip
    return config


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
