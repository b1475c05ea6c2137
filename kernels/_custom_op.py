"""The Triton backend as torch.library custom ops, so that the rest of PyTorch sees one op.

Why custom ops and not a bare autograd.Function around Triton launches:
- FlopCounterMode counts a registered op by its formula (Triton launches are invisible to it);
- torch.compile keeps the op opaque (fake implementations give it shapes) instead of tracing into
  launchers, and the backward is an op too, so AOTAutograd can place it in the backward graph;
- DeepSpeed ZeRO-3 gathers W inside the owning module's forward, and the op takes W as an argument.

`kernels::lora_linear` is the forward, `kernels::lora_linear_backward` the backward. Segment gates are
resolved before the op: the first `n_active` segments have g = 1, the rest are probes (g = 0 with a
gate that wants its gradient). Gate tensors that need a gradient are passed as `gates` only so that
autograd can route d g to them; `gate_seg[j]` says which segment gates[j] belongs to.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import flop_counter
from torch.utils.flop_counter import register_flop_formula

from . import _torch_path


@torch.library.custom_op("kernels::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: List[Tensor],
                    lora_b: List[Tensor], starts: List[int], scale: float, n_active: int,
                    gates: List[Tensor], gate_seg: List[int], residual: Optional[Tensor]) -> Tensor:
    from ._triton_lora import lora_forward
    return lora_forward(x, weight, bias, list(lora_a[:n_active]), list(lora_b[:n_active]),
                        list(starts[:n_active]), scale, residual)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, starts, scale, n_active, gates, gate_seg, residual):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("kernels::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_a: List[Tensor],
                             lora_b: List[Tensor], starts: List[int], scale: float, n_active: int,
                             need_x: bool, need_a: List[bool], need_b: List[bool],
                             need_g: List[bool]) -> List[Tensor]:
    """Returns [dx, dA_0.., dB_0.., dg_0..]; entries that are not needed are empty tensors."""
    from ._triton_lora import lora_backward
    dx, da, db, dg = lora_backward(dy, x, weight, list(lora_a), list(lora_b), list(starts), scale,
                                   n_active, need_x, need_a, need_b, need_g)
    # Outputs of a custom op may not alias each other: fresh empties, and dA_i split off one buffer is copied.
    return [dy.new_empty(0) if t is None else t if t._base is None else t.clone() for t in (dx, *da, *db, *dg)]


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, starts, scale, n_active, need_x, need_a, need_b, need_g):
    def none():
        return dy.new_empty(0)
    out = [x.new_empty(x.shape) if need_x else none()]
    out += [a.new_empty(a.shape) if n else none() for a, n in zip(lora_a, need_a)]
    out += [b.new_empty(b.shape) if n else none() for b, n in zip(lora_b, need_b)]
    out += [x.new_empty((), dtype=torch.float32) if n else none() for n in need_g]
    return out


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, starts, scale, n_active, gates, gate_seg, residual = inputs
    ctx.save_for_backward(x, weight, *lora_a, *lora_b)  # x, A, B (W is a reference): no M x N output
    ctx.n_seg = len(lora_a)
    ctx.starts, ctx.scale, ctx.n_active, ctx.gate_seg = list(starts), scale, n_active, list(gate_seg)
    ctx.gate_meta = [(g.dtype, g.device) for g in gates]
    ctx.has_residual = residual is not None


def _backward(ctx, dy):
    x, weight, *ab = ctx.saved_tensors
    n_seg = ctx.n_seg
    lora_a, lora_b = ab[:n_seg], ab[n_seg:]
    need_x, _, _, need_a, need_b, _, _, _, need_gates, _, need_res = ctx.needs_input_grad
    need_a, need_b = list(need_a), list(need_b)
    need_g = [False] * n_seg
    for j, seg in enumerate(ctx.gate_seg):
        need_g[seg] = bool(need_gates[j])
    out = _lora_linear_backward_op(dy.contiguous(), x, weight, lora_a, lora_b, ctx.starts, ctx.scale,
                                   ctx.n_active, bool(need_x), need_a, need_b, need_g)
    dx = out[0] if need_x else None
    da = [t if n else None for t, n in zip(out[1:1 + n_seg], need_a)]
    db = [t if n else None for t, n in zip(out[1 + n_seg:1 + 2 * n_seg], need_b)]
    dg_seg = out[1 + 2 * n_seg:]
    dgates = [dg_seg[seg].to(device=dev, dtype=dt) if need_g[seg] else None
              for seg, (dt, dev) in zip(ctx.gate_seg, ctx.gate_meta)]
    dres = dy if ctx.has_residual and need_res else None
    # Non-tensor list inputs flatten to a leaf when non-empty but to an empty list when empty.
    return dx, None, None, da, db, None, None, None, dgates, (None if ctx.gate_seg else []), dres


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# The torch path accumulates with the in-place aten.addmm_, which FlopCounterMode has no formula for
# (it would count 0): give it addmm's. FlopCounterMode copies the registry when it is constructed,
# which is why kernels/__init__ imports this module eagerly.
if torch.ops.aten.addmm_ not in flop_counter.flop_registry:
    register_flop_formula(torch.ops.aten.addmm_, get_raw=True)(flop_counter.addmm_flop)  # already shape-wrapped


def _mm_flops(m, k, n):
    return 2 * m * k * n


@register_flop_formula(torch.ops.kernels.lora_linear)
def _lora_linear_flops(x_shape, weight_shape, bias_shape, a_shapes, b_shapes, starts, scale, n_active,
                       *args, out_shape=None, **kwargs) -> int:
    """Base GEMM + 2MKR + 2MRn per active segment; probes cost nothing forward."""
    m, k = x_shape
    flops = _mm_flops(m, k, weight_shape[0])
    for a, b in zip(a_shapes[:n_active], b_shapes[:n_active]):
        flops += _mm_flops(m, k, a[0]) + _mm_flops(m, a[0], b[0])
    return flops


@register_flop_formula(torch.ops.kernels.lora_linear_backward)
def _lora_linear_backward_flops(dy_shape, x_shape, weight_shape, a_shapes, b_shapes, starts, scale,
                                n_active, need_x, need_a, need_b, need_g, out_shape=None, **kwargs) -> int:
    """What lora_backward does: dY W; dY_i B_i, dS A and dS^T x for the active segments; x A^T
    again where dB or a gate gradient is needed; dY_i^T S_i; the gate's dot product."""
    m, k = x_shape
    n_out = weight_shape[0]
    flops = _mm_flops(m, n_out, k) if need_x else 0
    for i, (a, b) in enumerate(zip(a_shapes, b_shapes)):
        r, n = a[0], b[0]
        active = i < n_active
        if (active and (need_x or need_a[i] or need_g[i])) or (not active and need_g[i]):
            flops += _mm_flops(m, n, r)  # dS_i = dY_i B_i
        if active and need_x:
            flops += _mm_flops(m, r, k)  # dS A into dX
        if active and need_a[i]:
            flops += _mm_flops(r, m, k)  # dS^T x
        if (active and need_b[i]) or need_g[i]:
            flops += _mm_flops(m, k, r)  # S = x A^T, recomputed
        if active and need_b[i]:
            flops += _mm_flops(n, m, r)  # dY_i^T S
        if need_g[i]:
            flops += 2 * m * r
    return flops


_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def lora_linear_triton(x, weight, bias, segments, scale, residual=None):
    """The triton backend on 2-D x (M, K); see lora_linear.lora_linear for the semantics."""
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    if x.dtype not in _SUPPORTED or torch.compiler.is_compiling() and any(
            s.gate_tensor is not None for s in segments):
        # float64, or tensor gates under torch.compile (their value cannot be read without a graph
        # break): the torch path handles both.
        return _torch_path.lora_linear_torch(x, weight, bias, segments, scale, residual)
    active, probes = _torch_path.plan_segments(segments)
    if not active and not probes:
        y = F.linear(x, weight, bias)  # the gated-block skip: exactly the plain linear
        return y if residual is None else y + residual
    segs = active + probes
    x = x.contiguous()
    gate_seg = [i for i, s in enumerate(segs) if s.gate_tensor is not None and s.gate_tensor.requires_grad]
    return _lora_linear_op(x, weight, bias, [s.a.contiguous() for s in segs],
                           [s.b.contiguous() for s in segs], [s.start for s in segs], scale, len(active),
                           [segs[i].gate_tensor for i in gate_seg], gate_seg,
                           None if residual is None else residual.contiguous())
