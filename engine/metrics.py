"""What a run costs: parameters, FLOPs per image, throughput, peak memory.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`. It does not see inside fused
attention (scaled_dot_product_attention) on the CPU, so counting runs timm's explicit attention
path (`attn.fused_attn = False`): same maths, every matmul visible. Training FLOPs are counted on
a real forward + backward, so frozen weights (no weight gradient) are counted honestly: ~2x
forward for LoRA, ~3x for full fine-tuning.
"""
from __future__ import annotations

import contextlib
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .precision import autocast


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@contextlib.contextmanager
def explicit_attention(model: nn.Module):
    """Switch timm attention to its unfused path so every matmul is visible to the FLOP counter."""
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in switched:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in switched:
            m.fused_attn = True


def gflops_per_image(model: nn.Module, input_size: int, train: bool = False, batch: int = 2,
                     extra_loss=None) -> float:
    """GFLOPs per image of a forward pass (train=False) or a forward + backward (train=True)."""
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    was_training = model.training
    model.train(train)
    counter = FlopCounterMode(display=False)
    with explicit_attention(model), counter:
        if train:
            logits = model(x)
            loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=device))
            extra = extra_loss() if extra_loss is not None else None
            if extra is not None:
                loss = loss + extra
            if loss.requires_grad:
                loss.backward()
        else:
            with torch.no_grad():
                model(x)
    if train:
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() / batch / 1e9


@torch.no_grad()
def inference_throughput(model: nn.Module, input_size: int, batch: int = 64, iters: int = 5,
                         autocast_dtype: torch.dtype | None = None) -> float:
    """Images per second of the model's forward pass on random inputs (after one warm-up)."""
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    model.eval()
    with autocast(device, autocast_dtype):
        model(x)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync(device)
    return batch * iters / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
