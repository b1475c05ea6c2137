"""What a backend of lora_linear is, and the prologue that every backend runs before its own code.

A backend is one module that defines `BACKEND = Backend(compute, ...)`, plus its entry in
lora_linear.BACKEND_TABLE. Calling a Backend runs the shared prologue, then `compute` on what is
left to compute:

- W and b are detached (frozen: they never get a gradient);
- gates are planned (`plan_segments`): a static 0 was dropped already, a frozen tensor gate is read
  on the host and dropped or made static, a gate that requires grad stays on the device;
- with nothing left (every gate off), the call is F.linear itself: the gated-block skip.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class Segment:
    """One LoRA update: writes columns [start, start + n) with g * (x A^T) B^T."""
    a: torch.Tensor  # (R, K)
    b: torch.Tensor  # (n, R)
    start: int
    # None: on (static). A 0-dim tensor: its value, 0. or 1., multiplies the update on the device.
    gate: Optional[torch.Tensor] = None


def _always_available(on_cuda):
    return None


@dataclass(frozen=True)
class Backend:
    """`compute(x, weight, bias, segments, scale, residual) -> y` on a planned 2-D problem: x (M, K),
    W (N, K) and b detached, at least one segment, scale a float."""
    compute: Callable
    # False: runs in the caller's dtypes under the caller's autocast (plain autograd does the casts);
    # True: the dispatcher casts every operand to one dtype and turns autocast off around compute.
    casts_operands: bool = True
    # on_cuda -> None, or why the backend cannot run on that device (completes "backend 'x' ...").
    unavailable: Callable[[bool], Optional[str]] = _always_available

    def __call__(self, x, weight, bias, segments, scale, residual=None):
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        segments = plan_segments(segments)
        if not segments:
            y = F.linear(x, weight, bias)  # the gated-block skip: exactly the plain linear
            return y if residual is None else y + residual
        return self.compute(x, weight, bias, segments, float(scale), residual)


def plan_segments(segments):
    """The segments to compute, each with gate None (on) or a device gate.

    A tensor gate that requires grad (selective LoRA's straight-through gate during the search) is
    never read by the host, which would be a sync on CUDA in every step: its value multiplies the
    update. So a probe (g = 0 with a requiring-grad gate) costs what an active segment costs, forward
    and backward, and yields exact zeros for A and B and the gate's gradient. A tensor gate that
    does not require grad is read here: 0 drops the segment (A and B are never touched), 1 makes it
    static. Under torch.compile nothing is read (it would break the graph): every tensor gate stays
    on the device.
    """
    compiling = torch.compiler.is_compiling()
    planned = []
    for seg in segments:
        gate = seg.gate
        if gate is None or gate.requires_grad or compiling:
            planned.append(seg)
            continue
        value = float(gate)
        if value not in (0.0, 1.0):
            raise ValueError(f"lora_linear: a gate tensor holds {value}; gates are hard indicators, 0. or 1. "
                             f"(apply the straight-through estimator before calling)")
        if value == 1.0:
            planned.append(Segment(seg.a, seg.b, seg.start, None))
    return planned
