"""The triton backend: the Triton kernels (kernels/_triton_lora.py) as torch.library custom ops.

Why custom ops and not a bare autograd.Function around Triton launches:
- FlopCounterMode counts a registered op by its formula (Triton launches are invisible to it);
- torch.compile keeps the op opaque (fake implementations give it shapes) instead of tracing into
  launchers, and the dX pass is an op too, so AOTAutograd can place it in the backward graph;
- DeepSpeed ZeRO-3 gathers W inside the owning module's forward, and the op takes W as an argument.

`kernels::lora_linear_triton` is the forward (one launch), `kernels::lora_linear_triton_dx` the dX
pass (one launch that also hands back dS = dY B in fp32); dA, dB and the gates' gradients are
plain torch ops (_fused.register_autograd). This module imports no Triton: _triton_lora is
imported when an op first runs.
"""
import importlib.util
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import _fused, _torch_path
from ._backend import Backend

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up once: no import, no call-time cost


@torch.library.custom_op("kernels::lora_linear_triton", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: List[Tensor],
                    lora_b: List[Tensor], starts: List[int], scale: float, gates: List[Tensor],
                    gate_seg: List[int], residual: Optional[Tensor]) -> Tensor:
    from ._triton_lora import lora_forward
    b_list = _fused.gated(lora_b, _fused.per_segment(gates, gate_seg, len(lora_b)))
    return lora_forward(x, weight, bias, list(lora_a), b_list, list(starts), scale, residual)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, starts, scale, gates, gate_seg, residual):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("kernels::lora_linear_triton_dx", mutates_args=())
def _input_grad_op(dy: Tensor, weight: Tensor, lora_a: List[Tensor], lora_b: List[Tensor],
                   starts: List[int], scale: float) -> Tuple[Tensor, Tensor]:
    """dX = dY W + s (dY B) A, and dS = dY B (M, R_tot) in fp32."""
    from ._triton_lora import lora_input_grad
    return lora_input_grad(dy, weight, list(lora_a), list(lora_b), list(starts), scale)


@_input_grad_op.register_fake
def _(dy, weight, lora_a, lora_b, starts, scale):
    m = dy.shape[0]
    return dy.new_empty((m, weight.shape[1])), dy.new_empty((m, sum(a.shape[0] for a in lora_a)), dtype=torch.float32)


def _mm_flops(m, k, n):
    return 2 * m * k * n


@register_flop_formula(torch.ops.kernels.lora_linear_triton)
def _lora_linear_flops(x_shape, weight_shape, bias_shape, a_shapes, b_shapes, *args, out_shape=None,
                       **kwargs) -> int:
    """Base GEMM + 2MKR + 2MRn per segment (the k range of a q/v-only qkv costs nothing)."""
    m, k = x_shape
    flops = _mm_flops(m, k, weight_shape[0])
    for a, b in zip(a_shapes, b_shapes):
        flops += _mm_flops(m, k, a[0]) + _mm_flops(m, a[0], b[0])
    return flops


@register_flop_formula(torch.ops.kernels.lora_linear_triton_dx)
def _input_grad_flops(dy_shape, weight_shape, a_shapes, b_shapes, *args, out_shape=None, **kwargs) -> int:
    """dY W + per segment dS_i = dY_i B_i and dS_i A_i."""
    m, n_out = dy_shape
    flops = _mm_flops(m, n_out, weight_shape[1])
    for a, b in zip(a_shapes, b_shapes):
        flops += _mm_flops(m, b[0], a[0]) + _mm_flops(m, a[0], a[1])
    return flops


def _input_grad(dy, x, weight, a_list, b_list, seg_gates, starts, scale, saved, need_x):
    if not need_x:
        return None, None, None
    dx, ds = _input_grad_op(dy.contiguous(), weight, _fused.gated(a_list, seg_gates), list(b_list), starts, scale)
    return dx, ds, None


_fused.register_autograd(_lora_linear_op, _input_grad)


_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def lora_linear_triton(x, weight, bias, segments, scale, residual=None):
    """The triton backend on 2-D x (M, K); see lora_linear.lora_linear for the semantics."""
    if x.dtype not in _SUPPORTED:
        return _torch_path.lora_linear_torch(x, weight, bias, segments, scale, residual)  # float64
    return _lora_linear_op(x.contiguous(), weight, bias, *_fused.op_args(segments, scale),
                           None if residual is None else residual.contiguous())


def _unavailable(on_cuda):
    if not _TRITON_INSTALLED:
        return "needs the triton package (pip install triton); use 'auto' or 'torch'"
    if on_cuda or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    return ("needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU for testing); use 'auto' or "
            "'torch' on this device")


BACKEND = Backend(lora_linear_triton, unavailable=_unavailable)
