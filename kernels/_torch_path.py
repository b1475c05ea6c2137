"""The torch backend, the fast path for machines without a GPU: the low-rank term never gets an M x N
tensor of its own.

Why it beats a LoRA nn.Module (HF peft's way): peft computes `base(x) + B(A(x)) * s`, which writes
and re-reads two extra M x N tensors forward and adds an M x K partial gradient backward. Here the
low-rank term rides on the base GEMM in one of two ways, chosen per call by which moves fewer bytes:

- activation side (few rows, M small): `addmm_(x A^T, B^T, alpha=s)` into the base output, BLAS
  accumulating in its epilogue, and the same into dX in backward; x A^T (M x R) is kept for dB.
- weight side (M large, fp32 or fp64): the base GEMM runs with W + s B A (an N x K update,
  rebuilt in backward for dX), so forward is one GEMM and dX one GEMM; x A^T is computed in
  backward, where dB needs it. 16-bit inputs stay on the activation side (see merge_pays).

Never saved: an M x N output. The forward is the custom op `kernels::lora_linear_torch`, so that
torch.compile keeps it whole (no graph break, in-place accumulation intact) and FlopCounterMode counts
it by its formula; the backward is plain torch ops (see _fused), which both of them see as they are.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import flop_counter
from torch.utils.flop_counter import register_flop_formula

from . import _fused
from ._backend import Backend

# The torch path accumulates with the in-place aten.addmm_ (dX on the activation side, W + s B A on
# the weight side), which FlopCounterMode has no formula for (it would count 0): give it addmm's.
# FlopCounterMode copies the registry when it is constructed, which is why `import kernels` imports
# every backend module.
if torch.ops.aten.addmm_ not in flop_counter.flop_registry:
    register_flop_formula(torch.ops.aten.addmm_, get_raw=True)(flop_counter.addmm_flop)  # already shape-wrapped


def merge_pays(m, k, n_out, rows, dtype=torch.float32):
    """True when folding the update into W moves fewer bytes than adding it to the activations.

    Weight side: W + s B A is built in forward and again in backward, each a copy of W (N x K) and
    an update of the segments' rows (n x K): about 2 K (N + n). Activation side: x A^T reads x
    (M K), the accumulation reads and writes the output's n columns (2 M n) forward and dX (2 M K)
    backward: M (3 K + 2 n). ViT-B at batch 8 (M = 1576) merges in every layer; a few tokens do not.

    16-bit operands never merge: W + s B A rounded to 16 bits drops every update smaller than half
    a unit of W (a bf16 LoRA term 0.3% of the output's size came through with 92% error folded into
    W, 50% added to the output), so small, early updates would not reach the forward at all.
    """
    if dtype not in (torch.float32, torch.float64):
        return False
    n = sum(rows)
    return m * (3 * k + 2 * n) > 2 * k * (n_out + n)


def _merges(x, weight, lora_b):
    return merge_pays(x.shape[0], x.shape[1], weight.shape[0], [b.shape[0] for b in lora_b], x.dtype)


def merged_weight(weight, a_list, b_list, starts, scale):
    """W with every listed segment's s B_i A_i added to its rows (a new tensor; W is untouched)."""
    if len(a_list) == 1 and starts[0] == 0 and b_list[0].shape[0] == weight.shape[0]:
        return torch.addmm(weight, b_list[0], a_list[0], alpha=scale)
    w = weight.clone()
    for a, b, start in zip(a_list, b_list, starts):
        w[start:start + b.shape[0]].addmm_(b, a, alpha=scale)
    return w


@torch.library.custom_op("kernels::lora_linear_torch", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: List[Tensor],
                    lora_b: List[Tensor], starts: List[int], scale: float, gates: List[Tensor],
                    gate_seg: List[int], residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """y (M, N), and x A^T (M, R_tot) kept for dB on the activation side (empty on the weight side)."""
    b_list = _fused.gated(lora_b, _fused.per_segment(gates, gate_seg, len(lora_b)))
    if _merges(x, weight, lora_b):  # weight side: one GEMM with W + s B A
        y = F.linear(x, merged_weight(weight, lora_a, b_list, starts, scale), bias)
        xa = x.new_empty(0)
    else:  # activation side: accumulate into the output in place
        y = F.linear(x, weight, bias)  # (M, N): addmm with the bias as its C operand
        xa = _fused.x_times_a(x, lora_a)  # (M, R_tot)
        r0 = 0
        for b, start in zip(b_list, starts):
            r = b.shape[1]
            y[:, start:start + b.shape[0]].addmm_(xa[:, r0:r0 + r], b.t(), alpha=scale)
            r0 += r
    if residual is not None:
        y.add_(residual)
    return y, xa


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, starts, scale, gates, gate_seg, residual):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    if _merges(x, weight, lora_b):
        return y, x.new_empty(0)
    return y, x.new_empty((sum(a.shape[0] for a in lora_a), x.shape[0])).t()


@register_flop_formula(torch.ops.kernels.lora_linear_torch, get_raw=True)
def _lora_linear_flops(x, weight, bias, lora_a, lora_b, starts, scale, gates, gate_seg, residual,
                       out_val=None, **kwargs) -> int:
    """Base GEMM + per segment 2 n R K (weight side: s B A into W's rows) or 2 M K R + 2 M R n
    (activation side: x A^T, then its product with B^T into the output)."""
    m, k = x.shape
    flops = 2 * m * k * weight.shape[0]
    merged = _merges(x, weight, lora_b)
    for a, b in zip(lora_a, lora_b):
        r, n = a.shape[0], b.shape[0]
        flops += 2 * n * r * k if merged else 2 * m * k * r + 2 * m * r * n
    return flops


def _input_grad(dy, x, weight, a_list, b_list, seg_gates, starts, scale, saved_xa, need_x):
    """dX = dY (W + s B A) on the weight side; dY W + s (dY B) A on the activation side, whose dS and
    the forward's x A^T go on to dA, dB and the gates. W is frozen, so no dW."""
    if _merges(x, weight, b_list):
        dx = dy @ merged_weight(weight, a_list, _fused.gated(b_list, seg_gates), starts, scale) if need_x else None
        return dx, None, None
    if not need_x:
        return None, None, saved_xa
    ds = _fused.dy_times_b(dy, b_list, starts)  # (M, R_tot)
    dx = dy @ weight
    dx.addmm_(ds, _fused.cat_rows(_fused.gated(a_list, seg_gates)), alpha=scale)
    return dx, ds, saved_xa


_fused.register_autograd(_lora_linear_op, _input_grad)


def lora_linear_torch(x, weight, bias, segments, scale, residual=None):
    """The torch backend on 2-D x (M, K); see lora_linear.lora_linear for the semantics."""
    y, _ = _lora_linear_op(x, weight, bias, *_fused.op_args(segments, scale), residual)
    return y


BACKEND = Backend(lora_linear_torch)
