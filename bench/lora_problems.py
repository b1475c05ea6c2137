"""What the kernel benchmark computes: ViT-B layers as LoRA-linear problems, the providers that
compute them (our backends, a module written the way HF peft computes, HF peft itself in the
peer worker of bench/peers.py, the gated-skip baselines), and the work each provider does (FLOPs, bytes).

A problem is `y = x W^T + b + s (x A_i^T) B_i^T` on the columns of each segment i, W frozen, at
M = batch x 197 tokens. Every provider of a problem gets the same tensors, so outputs compare.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import kernels

from . import peers
from .step_measures import mode_fn

TOKENS = 197  # ViT-B/16 at 224 px: 196 patches + CLS
# ViT-B/16 layers: (K, N, segments as (start, width)). qkv carries LoRA on q and v only.
SHAPES = {
    "qkv": (768, 2304, ((0, 768), (1536, 768))),
    "proj": (768, 768, ((0, 768),)),
    "fc1": (768, 3072, ((0, 3072),)),
    "fc2": (3072, 768, ((0, 768),)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# reference: the plain autograd composition; peft-style: PeftStyleLoRA; hf-peft: HF peft's LoRA
# Linear; torch, triton: our backends; triton-xa-buffer: triton with x A^T precomputed into an
# M x R buffer instead of inside the GEMM loop; linear, torch-g0: the gated skip's baselines (plain
# F.linear, and our op with every gate 0).
PROVIDERS = ("reference", "peft-style", "hf-peft", "torch", "triton", "triton-xa-buffer", "linear", "torch-g0")
PEER_PROVIDERS = ("hf-peft",)  # built and timed in the peer worker (bench/peers.py), not in this process
MODES = ("forward", "backward", "full")
GATED_OFF = ("linear", "torch-g0")  # providers that compute no LoRA term
DIFFERENT_WORK = "different: LoRA on all of q, k, v (peft#1705)"


@dataclass
class Problem:
    shape: str
    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    x: torch.Tensor  # (M, K), requires grad
    weight: torch.Tensor  # (N, K), frozen
    bias: torch.Tensor  # (N,)
    lora_a: list  # [(R, K)] per segment, require grad
    lora_b: list  # [(n_i, R)] per segment, require grad
    starts: list  # first output column of each segment
    dy: torch.Tensor  # (M, N), the gradient fed to backward
    scale: float = 2.0

    @property
    def segments(self):
        """(start, width) of each segment."""
        return tuple((s, b.shape[0]) for s, b in zip(self.starts, self.lora_b))


@lru_cache(maxsize=8)
def build_problem(shape: str, batch: int, rank: int, dtype_name: str, device: str) -> Problem:
    """The layer `shape` at M = batch x 197, rank `rank`: seeded random tensors (the same for every
    dtype), W and A at the 1/sqrt(K) scale of an initialised layer, B small as after a few steps."""
    k, n, segs = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    m = batch * TOKENS
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)

    return Problem(shape, m, k, n, rank, dtype, rand(m, k).requires_grad_(), rand(n, k, std=k ** -0.5),
                   rand(n), [rand(rank, k, std=k ** -0.5).requires_grad_() for _ in segs],
                   [rand(w, rank, std=0.1).requires_grad_() for _, w in segs], [s for s, _ in segs],
                   rand(m, n))


# --------------------------------------------------------------------------------------------------
# Baselines: LoRA the way peft computes it.

class PeftStyleLoRA(nn.Module):
    """A frozen Linear with LoRA segments, computed as HF peft's LoRA Linear does (out of place),
    each q/v update zero-padded to the qkv width as litgpt does: what peft would cost if it could
    target q and v of a fused qkv."""

    def __init__(self, weight, bias, lora_a, lora_b, starts, scale):
        super().__init__()
        self.base = _frozen_linear(weight, bias)
        self.lora_A = nn.ModuleList(_linear_with(a) for a in lora_a)
        self.lora_B = nn.ModuleList(_linear_with(b) for b in lora_b)
        self.starts, self.scaling, self.dropout = list(starts), scale, nn.Identity()

    def forward(self, x):
        result = self.base(x)
        n_out = result.shape[-1]
        for lora_a, lora_b, start in zip(self.lora_A, self.lora_B, self.starts):
            delta = lora_b(lora_a(self.dropout(x))) * self.scaling
            if delta.shape[-1] != n_out:  # q / v inside the fused qkv: zero-pad to the full width
                delta = F.pad(delta, (start, n_out - start - delta.shape[-1]))
            result = result + delta
        return result


def peft_can_express(p: Problem) -> bool:
    """True when HF peft does the problem's own work: one LoRA over the whole output. It cannot put
    LoRA on only q and v of timm's fused qkv (huggingface/peft#1705)."""
    return peers.peft_can_express(p.segments, p.n)


def hf_peft_layer(p: Problem) -> str:
    """HF peft's LoRA Linear on the problem's tensors (bench/peers.py's `lora_layer`: peft's own
    layer, built with `get_peft_model` as a user builds it), in this process's peer worker: peft
    cannot be imported beside this project's `kernels`. Its key there, for `lora_times` and
    `lora_outputs`."""
    key = f"{p.shape}-{p.m}-{p.r}-{p.dtype}-{p.x.device}"
    return peers.shared().lora_layer(key, p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.starts, p.dy, p.scale)


def _frozen_linear(weight, bias):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def _linear_with(weight):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach())
    return lin


# --------------------------------------------------------------------------------------------------
# Providers

def available_providers(device: str) -> tuple[str, ...]:
    """PROVIDERS that run here: triton ones on CUDA only, hf-peft where peft is installed."""
    return tuple(p for p in PROVIDERS if (device == "cuda" or not p.startswith("triton"))
                 and (p != "hf-peft" or importlib.util.find_spec("peft") is not None))


def forward_fn(p: Problem, provider: str):
    """A closure computing y for one provider."""
    if provider == "peft-style":
        module = PeftStyleLoRA(p.weight, p.bias, p.lora_a, p.lora_b, p.starts, p.scale)
        return lambda: module(p.x)
    if provider in PEER_PROVIDERS:
        raise ValueError(f"{provider} runs in the peer worker (hf_peft_layer), not in this process")
    if provider == "linear":
        return lambda: F.linear(p.x, p.weight, p.bias)
    backend = {"torch-g0": "torch", "triton-xa-buffer": "triton"}.get(provider, provider)
    gates = [0.0] * len(p.starts) if provider == "torch-g0" else None
    return lambda: kernels.lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.starts, p.scale,
                                       gates=gates, backend=backend)


def bench_fn(p: Problem, provider: str, mode: str):
    """The callable to time: forward, backward of a retained graph, or both."""
    return mode_fn(forward_fn(p, provider), p.dy, mode)


@contextlib.contextmanager
def xa_buffer(provider: str):
    """Run `triton-xa-buffer` with the x A^T precompute instead of the in-loop product (it switches
    kernels._triton_lora.FUSE_XA for the duration: the kernels offer no argument for it)."""
    if provider != "triton-xa-buffer":
        yield
        return
    from kernels import _triton_lora
    old = dict(_triton_lora.FUSE_XA)
    _triton_lora.FUSE_XA.update({key: False for key in old})
    try:
        yield
    finally:
        _triton_lora.FUSE_XA.update(old)


# --------------------------------------------------------------------------------------------------
# Work: what a provider computes, in FLOPs and bytes.

def work_segments(p: Problem, provider: str) -> tuple[tuple[int, int], ...]:
    """(start, width) of the LoRA updates `provider` computes: none for the gated-off baselines, the
    whole output for HF peft where it cannot do the problem's own segments, else the problem's."""
    if provider in GATED_OFF:
        return ()
    if provider == "hf-peft" and not peft_can_express(p):
        return ((0, p.n),)
    return p.segments


def work_note(p: Problem, provider: str) -> str:
    """'' when `provider` computes the problem itself, else what it computes instead."""
    return DIFFERENT_WORK if provider == "hf-peft" and not peft_can_express(p) else ""


def useful_flops(p: Problem, provider: str, mode: str) -> int:
    """FLOPs of the work `provider` does, counted by FlopCounterMode over the reference composition
    (torch's registered formulas for its mm / addmm, on meta tensors: nothing is computed). The
    count is the same for every provider doing that work: a provider's recomputation is not credited."""
    fwd, bwd = _reference_flops(p.m, p.k, p.n, p.r, work_segments(p, provider))
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


@lru_cache(maxsize=None)
def _reference_flops(m, k, n, r, segments):
    def meta(*shape, grad=False):
        return torch.empty(*shape, device="meta", requires_grad=grad)

    x = meta(m, k, grad=True)
    a = [meta(r, k, grad=True) for _ in segments]
    b = [meta(w, r, grad=True) for _, w in segments]
    with FlopCounterMode(display=False) as forward:
        y = kernels.lora_linear(x, meta(n, k), meta(n), a, b, [s for s, _ in segments], 2.0, backend="reference")
    with FlopCounterMode(display=False) as backward:
        y.backward(meta(m, n))
    return forward.get_total_flops(), backward.get_total_flops()


def min_bytes(p: Problem, provider: str, mode: str) -> int:
    """Bytes a perfectly fused implementation of the work must move: each operand read once, each
    result written once. A model, not a count: no registered formula gives bytes (FLOPs have them)."""
    e = p.x.element_size()
    m, k, n, r = p.m, p.k, p.n, p.r
    ab = sum(r * k + w * r for _, w in work_segments(p, provider))
    fwd = e * (m * k + n * k + n + m * n + ab)  # x, W, b, A, B in; y out
    bwd = e * (m * n + n * k + 2 * m * k + 2 * ab)  # dY, W, x, A, B in; dX, dA, dB out
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
