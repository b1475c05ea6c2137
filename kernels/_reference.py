"""The reference backend, the obvious PyTorch composition of the fused LoRA linear: ground truth for
every test and benchmark.

Nothing here is clever on purpose: a plain linear, then one low-rank product per segment padded to
the full width and added. Autograd derives every gradient, so the other backends are checked against
derivatives nobody wrote by hand.
"""
import torch.nn.functional as F

from ._backend import Backend


def lora_linear_reference(x, weight, bias, segments, scale, residual=None):
    """y = x W^T + b (+ residual) + sum_i g_i * s * pad((x A_i^T) B_i^T) over the planned segments."""
    n_out = weight.shape[0]
    y = F.linear(x, weight, bias)  # (M, N)
    if residual is not None:
        y = y + residual
    for seg in segments:
        delta = (x @ seg.a.t()) @ seg.b.t() * scale  # (M, n_i)
        if seg.gate is not None:
            delta = delta * seg.gate.to(delta.dtype)
        y = y + F.pad(delta, (seg.start, n_out - seg.start - seg.b.shape[0]))
    return y


BACKEND = Backend(lora_linear_reference, casts_operands=False)
