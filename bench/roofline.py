"""How fast the LoRA linear could run: this machine's measured peaks, GPUs' datasheet peaks, the
roofline bound of a piece of work, and the per-kernel prediction for a GPU (fused op vs eager base +
LoRA), see bench/README.md.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .timing import best_time

# The per-launch floor of the GPU prediction: an assumed 3 us (a typical CUDA kernel launch; not
# measured here, no GPU has been lent to this project). A run on a GPU predicts from the peaks it
# measures itself (measure_peaks); without one, from the datasheet peaks below.
LAUNCH_US = 3.0

# Datasheet peaks (dense, no structured sparsity): GFLOP/s per operand class and memory GB/s.
# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column; NVIDIA A100 Tensor Core GPU datasheet,
# A100 80GB SXM column; NVIDIA L40S datasheet. Vendor figures at boost clock, not measured here.
DATASHEET_PEAKS = {
    "sm_90": dict(device="H100 SXM", source="NVIDIA H100 datasheet (SXM, dense)",
                  gflops={"fp32": 67_000, "tf32": 494_500, "bf16": 989_500, "fp16": 989_500}, gbps=3_350),
    "sm_80": dict(device="A100 80GB SXM", source="NVIDIA A100 datasheet (80GB SXM, dense)",
                  gflops={"fp32": 19_500, "tf32": 156_000, "bf16": 312_000, "fp16": 312_000}, gbps=2_039),
    "sm_89": dict(device="L40S", source="NVIDIA L40S datasheet (dense)",
                  gflops={"fp32": 91_600, "tf32": 183_000, "bf16": 362_050, "fp16": 362_050}, gbps=864),
}


def measure_peaks(device: str, dtype: torch.dtype, reps: int,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """This machine's own GEMM peak (GFLOP/s) for the dtype and its copy bandwidth (GB/s)."""
    gflops = 0.0
    # a big square product and the largest ViT-B GEMM at batch 8 (the BLAS may do better on either)
    for m, k, n in ([(8192,) * 3] if device == "cuda" else [(2048,) * 3, (1576, 768, 3072)]):
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        gflops = max(gflops, 2 * m * k * n / best_time(lambda: a @ b, device, reps, clock) / 1e9)
    src = torch.empty(64 * 2 ** 20 if device == "cpu" else 512 * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return gflops, 2 * src.numel() / best_time(lambda: dst.copy_(src), device, reps, clock) / 1e9


def roofline_seconds(flops: int, nbytes: int, peak_gflops: float, peak_gbps: float) -> float:
    """The least time the work can take here: bound by compute or by memory traffic."""
    return max(flops / (peak_gflops * 1e9), nbytes / (peak_gbps * 1e9))


def roofline_prediction(m, k, n, r, widths, elt, peak_gflops, peak_gbps, launch_us=LAUNCH_US):
    """Predicted fwd + bwd time (s) of the fused op and of eager base + LoRA (the peft-style module):
    each kernel costs max(FLOPs / peak, bytes / bandwidth, launch floor). Returns (fused, eager).

    A per-kernel model, written out by hand: FlopCounterMode counts ops, not the kernels a fused
    implementation would launch, and no formula gives bytes."""
    def t(flops, nbytes):
        return max(flops / (peak_gflops * 1e9), nbytes * elt / (peak_gbps * 1e9), launch_us * 1e-6)

    rt = r * len(widths)
    fused = [
        t(2 * m * k * n + sum(2 * m * k * r + 2 * m * r * w for w in widths),  # forward: one kernel
          m * k + n * k + n + m * n + sum(r * k + w * r for w in widths)),
        t(2 * m * n * k + sum(2 * m * w * r + 2 * m * r * k for w in widths),  # dX = dY W + s (dY B) A
          m * n + n * k + m * k + 2 * m * rt + sum(r * k + w * r for w in widths)),
        t(2 * m * rt * k, m * rt + m * k + rt * k),  # dA = s dS^T x
        t(2 * m * k * rt, m * k + m * rt + rt * k),  # S = x A^T again
    ] + [t(2 * m * w * r, m * w + m * r + w * r) for w in widths]  # dB_i = s dY_i^T S_i
    fused += [t(0, n * rt)] * (2 if len(widths) > 1 else 0)  # stacking A and B (fwd and bwd)
    eager = [t(2 * m * k * n, m * k + n * k + m * n), t(2 * m * n * k, m * n + n * k + m * k)]  # base fwd, dX
    for w in widths:
        eager += [t(2 * m * k * r, m * k + m * r), t(2 * m * r * w, m * r + m * w),  # A(x), B(.)
                  t(m * w, 2 * m * w)]  # * s
        if w != n:
            eager += [t(0, m * w + m * n)]  # zero-pad to the qkv width
        eager += [t(m * n, 3 * m * n)]  # result + delta
        eager += [t(m * w, 2 * m * w), t(2 * m * w * r, m * w + m * r + w * r),  # grad * s, dB
                  t(2 * m * w * r, m * w + m * r), t(2 * m * r * k, m * r + m * k + r * k),  # dh, dA
                  t(2 * m * r * k, m * r + m * k), t(m * k, 3 * m * k)]  # dx_lora, dx += dx_lora
    return sum(fused), sum(eager)
