"""Numeric precision of a run: the names `--precision` accepts and the autocast each one means.

Mixed precision is autocast with fp32 master weights: bf16 on CPUs with AVX-512 bf16 units or on
GPUs, fp16 on CUDA only.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> autocast dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype` on `device`'s type; a no-op for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
