"""What the torch and Triton backends' fused ops share: their arguments, device gates, and the
low-rank half of their backward.

Each backend registers a torch.library custom op with the arguments of `op_args`:

    (x, weight, bias, lora_a, lora_b, starts, scale, gates, gate_seg, residual)

`gates` are the device gates (0-dim tensors the host never reads, see _backend.plan_segments) and
`gate_seg[j]` the segment of gates[j]. The ops fold a gate into B forward and into A for dX (`gated`):
g is exactly 0 or 1, so the products stay exact and g = 0 gives exact zeros. `register_autograd`
gives an op its backward: the backend supplies dX (and dS = dY B, S = x A^T if it has them), this
module the rest, in plain torch ops (FlopCounterMode counts them, torch.compile traces them):

    dA_i = g_i s dS_i^T x,   dB_i = g_i s dY_i^T S_i,   d g_i = s sum(dS_i * S_i)   (dS_i = dY_i B_i)
"""
import torch


def op_args(segments, scale):
    """lora_a, lora_b, starts, scale, gates, gate_seg for the fused ops, from planned segments."""
    gate_seg = [i for i, s in enumerate(segments) if s.gate is not None]
    return ([s.a.contiguous() for s in segments], [s.b.contiguous() for s in segments],
            [s.start for s in segments], scale, [segments[i].gate for i in gate_seg], gate_seg)


def per_segment(gates, gate_seg, n_seg):
    """The gate of each segment, None where it is static."""
    out = [None] * n_seg
    for gate, i in zip(gates, gate_seg):
        out[i] = gate
    return out


def gated(tensors, seg_gates):
    """tensors[i] * g_i where segment i has a device gate (a new tensor), else tensors[i] itself."""
    return [t if g is None else t * g for t, g in zip(tensors, seg_gates)]


def cat_rows(tensors):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def x_times_a(x, a_list):
    """S = x A_cat^T (M, R_tot), as the transpose of A x^T: a CPU BLAS streams the tall x faster this way."""
    return (cat_rows(a_list) @ x.t()).t()


def dy_times_b(dy, b_list, starts):
    """dS = [dY_i B_i]_i (M, R_tot); (B^T dY_i^T)^T is several times faster on a CPU than dY_i B
    (the strided, tall operand is read along rows)."""
    ds = [(b.t() @ dy[:, s:s + b.shape[0]].t()).t() for b, s in zip(b_list, starts)]
    return ds[0] if len(ds) == 1 else torch.cat(ds, dim=1)


def gate_grad(dy_i, x, a, b, scale, ds=None, xa=None):
    """The straight-through gradient d g = s * sum((dY_i B) * (x A^T)), a scalar in fp32 (or fp64).

    It is one sum over M x R products with random signs, so 16-bit operands would leave ~1% error in
    it: for 16-bit inputs the two M x R factors are recomputed from fp32 copies (ds and xa are reused
    only when they are already at least fp32)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    if ds is None or ds.dtype not in (torch.float32, torch.float64):
        ds = dy_i.to(acc) @ b.to(acc)
    if xa is None or xa.dtype not in (torch.float32, torch.float64):
        xa = x.to(acc) @ a.to(acc).t()
    return (ds.to(acc) * xa.to(acc)).sum() * scale


def lowrank_grads(dy, x, a_list, b_list, starts, scale, seg_gates, need_a, need_b, need_g, ds=None, xa=None):
    """[dA_i], [dB_i], [d g_i] (None where not needed), reusing dS (M, R_tot, any float dtype) and
    S = x A^T (M, R_tot) where the caller has them. dA is one skinny GEMM for all segments."""
    n_seg = len(a_list)
    ranks = [a.shape[0] for a in a_list]
    offs = [sum(ranks[:i]) for i in range(n_seg)]
    dy_seg = [dy[:, s:s + b.shape[0]] for s, b in zip(starts, b_list)]  # (M, n_i) views
    da, db, dg = [None] * n_seg, [None] * n_seg, [None] * n_seg
    if any(need_a):
        if ds is None:
            ds = dy_times_b(dy, b_list, starts)
        da_cat = (ds.to(x.dtype).t() @ x).mul_(scale)  # (R_tot, K)
        for i in range(n_seg):
            if need_a[i]:
                da_i = da_cat[offs[i]:offs[i] + ranks[i]]
                da[i] = da_i if seg_gates[i] is None else da_i.mul_(seg_gates[i])
    if any(need_b) and xa is None:
        xa = x_times_a(x, a_list)
    for i in range(n_seg):
        xa_i = None if xa is None else xa[:, offs[i]:offs[i] + ranks[i]]
        if need_b[i]:
            coef = scale if seg_gates[i] is None else seg_gates[i] * scale
            db[i] = (xa_i.t() @ dy_seg[i]).mul_(coef).t()  # (n_i, R_i), via (R_i, n_i): see dy_times_b
        if need_g[i]:
            ds_i = None if ds is None else ds[:, offs[i]:offs[i] + ranks[i]]
            dg[i] = gate_grad(dy_seg[i], x, a_list[i], b_list[i], scale, ds_i, xa_i).to(seg_gates[i].dtype)
    return da, db, dg


def register_autograd(op, input_grad):
    """Register the backward of a fused op (arguments as in op_args; output y, or (y, S) where the
    forward keeps S = x A^T for backward).

    input_grad(dy, x, weight, a_list, b_list, seg_gates, starts, scale, saved, need_x) -> (dx, dS, S):
    dX if need_x, and the dS and S it has (None otherwise) for lowrank_grads to reuse; `saved` is
    the forward's second output, or None.
    """
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, starts, scale, gates, gate_seg, residual = inputs
        saved = output[1] if isinstance(output, tuple) else None
        ctx.save_for_backward(x, weight, saved, *lora_a, *lora_b, *gates)  # no M x N tensor
        ctx.n_seg, ctx.starts, ctx.scale, ctx.gate_seg = len(lora_a), list(starts), scale, list(gate_seg)
        ctx.has_residual = residual is not None
        if saved is not None:
            ctx.mark_non_differentiable(saved)

    def backward(ctx, dy, *unused):
        x, weight, saved, *rest = ctx.saved_tensors
        n_seg = ctx.n_seg
        a_list, b_list, gates = rest[:n_seg], rest[n_seg:2 * n_seg], rest[2 * n_seg:]
        seg_gates = per_segment(gates, ctx.gate_seg, n_seg)
        need_x, _, _, need_a, need_b, _, _, need_gates, _, need_res = ctx.needs_input_grad
        need_g = [bool(n) for n in per_segment(need_gates, ctx.gate_seg, n_seg)]
        dx, ds, xa = input_grad(dy, x, weight, a_list, b_list, seg_gates, ctx.starts, ctx.scale, saved,
                                bool(need_x))
        da, db, dg = lowrank_grads(dy, x, a_list, b_list, ctx.starts, ctx.scale, seg_gates, list(need_a),
                                   list(need_b), need_g, ds, xa)
        dgates = [dg[i] for i in ctx.gate_seg]
        dres = dy if ctx.has_residual and need_res else None
        # Non-tensor list inputs flatten to a leaf when non-empty but to an empty list when empty.
        return dx, None, None, da, db, None, None, dgates, (None if ctx.gate_seg else []), dres

    op.register_autograd(backward, setup_context=setup_context)
