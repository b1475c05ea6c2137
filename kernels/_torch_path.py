"""The torch fast path for machines without a GPU: the low-rank term never gets an M x N tensor of its own.

Why it beats a LoRA nn.Module (HF peft's way): peft computes `base(x) + B(A(x)) * s`, which writes
and re-reads two extra M x N tensors forward and adds an M x K partial gradient backward. Here the
low-rank term rides on the base GEMM in one of two ways, chosen per call by which moves fewer bytes:

- activation side (few rows, M small): `addmm_(x A^T, B^T, alpha=s)` into the base output, BLAS
  accumulating in its epilogue, and the same into dX in backward; x A^T (M x R) is kept for dB.
- weight side (M large, fp32 or fp64): the base GEMM runs with W + s B A (an N x K update,
  rebuilt in backward for dX), so forward is one GEMM and dX one GEMM; x A^T is computed in
  backward, where dB needs it. 16-bit inputs stay on the activation side (see merge_pays).

Never saved: an M x N output. Gated-off segments are dropped before the autograd.Function
(plan_segments), so they cost nothing at all; with every gate off the call is F.linear itself.
"""
import torch
import torch.nn.functional as F


def _gate_value(t):
    """Read a 0-dim gate on the host and check it is a hard indicator."""
    g = float(t.detach())
    if g not in (0.0, 1.0):
        raise ValueError(f"lora_linear: a gate tensor holds {g}; gates are hard indicators, 0. or 1. "
                         f"(apply the straight-through estimator before calling)")
    return g


def plan_segments(segments):
    """Split segments into active ones (g = 1) and probes (g = 0 but the gate wants its gradient).

    A 0-gate that does not require grad is dropped here: its A and B are never touched again.
    """
    active, probes = [], []
    for seg in segments:
        g = 1.0 if seg.gate_tensor is None else _gate_value(seg.gate_tensor)
        if g == 1.0:
            active.append(seg)
        elif seg.gate_tensor.requires_grad:
            probes.append(seg)
    return active, probes


def _cat_rows(tensors):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


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


def merged_weight(weight, a_list, b_list, starts, scale):
    """W with every listed segment's s B_i A_i added to its rows (a new tensor; W is untouched)."""
    if len(a_list) == 1 and starts[0] == 0 and b_list[0].shape[0] == weight.shape[0]:
        return torch.addmm(weight, b_list[0], a_list[0], alpha=scale)
    w = weight.clone()
    for a, b, start in zip(a_list, b_list, starts):
        w[start:start + b.shape[0]].addmm_(b, a, alpha=scale)
    return w


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


class _LoRALinearFunction(torch.autograd.Function):
    """Base linear + the low-rank term on the weight or the activation side; backward by hand, no dW
    or db (frozen).

    The segments' A are stacked so that x A^T, dS A and dS^T x are one skinny GEMM each, whatever
    the number of segments (x and dX are streamed once, not once per segment).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, scale, starts, n_active, *ab_gates):
        # ab_gates: A_0..A_{S-1}, B_0..B_{S-1}, gate_0..gate_{S-1}; the first n_active segments have
        # g = 1, the rest are probes (g = 0, gradient to the gate only).
        n_seg = len(starts)
        a_list, b_list, gates = ab_gates[:n_seg], ab_gates[n_seg:2 * n_seg], ab_gates[2 * n_seg:]
        merged = bool(n_active) and merge_pays(x.shape[0], x.shape[1], weight.shape[0],
                                                   [b.shape[0] for b in b_list[:n_active]], x.dtype)
        xa = None
        if merged:  # weight side: one GEMM with W + s B A
            y = F.linear(x, merged_weight(weight, a_list[:n_active], b_list[:n_active], starts, scale), bias)
        else:
            y = F.linear(x, weight, bias)  # (M, N): addmm with the bias as its C operand
        if residual is not None:
            y.add_(residual)
        if n_active and not merged:  # activation side: accumulate into the output in place
            # (M, R_tot) as the transpose of A x^T: a CPU BLAS streams the tall x faster this way round
            xa = (_cat_rows(a_list[:n_active]) @ x.t()).t()
            r0 = 0
            for i in range(n_active):
                r, start = b_list[i].shape[1], starts[i]
                y[:, start:start + b_list[i].shape[0]].addmm_(xa[:, r0:r0 + r], b_list[i].t(), alpha=scale)
                r0 += r
        ctx.save_for_backward(x, weight, xa, *a_list, *b_list)
        ctx.scale, ctx.starts, ctx.n_active, ctx.merged = scale, starts, n_active, merged
        ctx.gate_meta = [None if g is None else (g.dtype, g.device) for g in gates]
        ctx.has_residual = residual is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, xa_saved, *ab = ctx.saved_tensors
        n_seg, n_act, s = len(ctx.starts), ctx.n_active, ctx.scale
        a_list, b_list = ab[:n_seg], ab[n_seg:]
        need = ctx.needs_input_grad
        need_a = need[7:7 + n_seg]
        need_b = need[7 + n_seg:7 + 2 * n_seg]
        need_g = need[7 + 2 * n_seg:]
        ranks = [a.shape[0] for a in a_list]
        offs = [sum(ranks[:i]) for i in range(n_seg)]
        dy_seg = [dy[:, st:st + b.shape[0]] for st, b in zip(ctx.starts, b_list)]  # (M, n_i) views
        # Skinny products in the orientation BLAS likes: (B^T dY_i^T)^T and (S_i^T dY_i)^T are several
        # times faster on a CPU than dY_i B and dY_i^T S_i (the strided, tall operand is read along rows).
        ds = [(b_list[i].t() @ dy_seg[i].t()).t() for i in range(n_seg)]  # (M, R_i), transposed view
        dx = None
        if need[0] and ctx.merged:  # (M, K) = dY (W + s B A): W is frozen, so no dW
            dx = dy @ merged_weight(weight, a_list[:n_act], b_list[:n_act], ctx.starts, s)
        elif need[0]:
            dx = dy @ weight
        da, db, dg = [None] * n_seg, [None] * n_seg, [None] * n_seg
        if n_act and ((need[0] and not ctx.merged) or any(need_a[:n_act])):
            ds_act = ds[0] if n_act == 1 else torch.cat(ds[:n_act], dim=1)  # (M, R_tot)
            if need[0] and not ctx.merged:
                dx.addmm_(ds_act, _cat_rows(a_list[:n_act]), alpha=s)
            if any(need_a[:n_act]):
                da_cat = (ds_act.t() @ x).mul_(s)  # (R_tot, K)
                for i in range(n_act):
                    if need_a[i]:
                        da[i] = da_cat[offs[i]:offs[i] + ranks[i]]
        want_xa = [(i < n_act and need_b[i]) or need_g[i] for i in range(n_seg)]
        if any(want_xa):
            if xa_saved is not None and n_act == n_seg:
                xa = xa_saved  # (M, sum R_i) from the forward
            else:  # weight side, or probes (g = 0 segments wanting their gate's gradient)
                xa = (_cat_rows(a_list) @ x.t()).t()
            for i in range(n_seg):
                if not want_xa[i]:
                    continue
                xa_i = xa[:, offs[i]:offs[i] + ranks[i]]
                if i < n_act and need_b[i]:
                    db[i] = (xa_i.t() @ dy_seg[i]).mul_(s).t()  # (n_i, R_i)
                if need_g[i]:
                    dt, dev = ctx.gate_meta[i]
                    dg[i] = gate_grad(dy_seg[i], x, a_list[i], b_list[i], s, ds[i], xa_i).to(device=dev, dtype=dt)
        for i in range(n_act, n_seg):  # probes: the gate has its gradient, A and B get exact zeros
            da[i] = torch.zeros_like(a_list[i]) if need_a[i] else None
            db[i] = torch.zeros_like(b_list[i]) if need_b[i] else None
        dres = dy if ctx.has_residual and need[3] else None
        return (dx, None, None, dres, None, None, None, *da, *db, *dg)


def lora_linear_torch(x, weight, bias, segments, scale, residual=None):
    """The torch backend on 2-D x (M, K); see lora_linear.lora_linear for the semantics."""
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    if torch.compiler.is_compiling():
        # Under torch.compile a tensor gate cannot be read on the host without a graph break: keep
        # every segment and multiply by the gate (the skip is an eager-mode saving).
        return _lora_linear_traced(x, weight, bias, segments, scale, residual)
    active, probes = plan_segments(segments)
    if not active and not probes:
        y = F.linear(x, weight, bias)  # the gated-block skip: exactly the plain linear
        return y if residual is None else y + residual
    segs = active + probes
    starts = tuple(seg.start for seg in segs)
    return _LoRALinearFunction.apply(x, weight, bias, residual, scale, starts, len(active),
                                     *[seg.a for seg in segs], *[seg.b for seg in segs],
                                     *[seg.gate_tensor for seg in segs])


def _lora_linear_traced(x, weight, bias, segments, scale, residual):
    """Branch-free form for torch.compile: the gate multiplies the low-rank term."""
    y = F.linear(x, weight, bias)
    if residual is not None:
        y = y + residual
    n_out = weight.shape[0]
    for seg in segments:
        delta = (x @ seg.a.t()) @ seg.b.t()
        coef = scale if seg.gate_tensor is None else seg.gate_tensor.to(delta.dtype) * scale
        y = y + F.pad(delta * coef, (seg.start, n_out - seg.start - seg.b.shape[0]))
    return y
