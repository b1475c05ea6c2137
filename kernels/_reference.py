"""The obvious PyTorch composition of the fused LoRA linear: ground truth for every test and benchmark.

Nothing here is clever on purpose: a plain linear, then one low-rank product per segment padded to
the full width and added. Autograd derives every gradient, so the other backends are checked against
derivatives nobody wrote by hand.
"""
import torch.nn.functional as F


def lora_linear_reference(x, weight, bias, segments, scale, residual=None):
    """y = x W^T + b (+ residual) + sum_i g_i * s * pad((x A_i^T) B_i^T) over the segments.

    x: (M, K); weight: (N, K); bias: (N,) or None; segments: list of `Segment` (see lora_linear.py)
    whose gate is already normalised (static 0 segments removed). W and b are frozen: detached.
    """
    n_out = weight.shape[0]
    y = F.linear(x, weight.detach(), None if bias is None else bias.detach())  # (M, N)
    if residual is not None:
        y = y + residual
    for seg in segments:
        if seg.gate_tensor is not None and not seg.gate_tensor.requires_grad and float(seg.gate_tensor.detach()) == 0.0:
            continue  # an inactive, frozen gate: the segment does not exist for this call
        delta = (x @ seg.a.t()) @ seg.b.t() * scale  # (M, n_i)
        if seg.gate_tensor is not None:
            delta = delta * seg.gate_tensor.to(delta.dtype)
        y = y + F.pad(delta, (seg.start, n_out - seg.start - seg.b.shape[0]))
    return y
