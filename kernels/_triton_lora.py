"""Triton kernels for the fused LoRA linear, their launchers and the fixed launch configurations.

One kernel serves both big GEMMs, because forward and the dX pass have the same shape:

    forward   y  = x  @ W^T + s * (x  @ A^T) @ B^T + b + residual     (Q = K, P = N)
    dX pass   dX = dY @ W   + s * (dY @ B)   @ A                       (Q = N, P = K)

i.e. C = X @ Wm + s * L @ V (+ bias + residual), where the low-rank activations L = X @ U are either
accumulated in the same Q loop as the base product (FUSE_L: one read of each X tile feeds both dots)
or read from a precomputed M x R buffer. The low-rank term is added to the fp32 accumulator before the
single store, so the M x N output is written once. Column tiles that no LoRA segment touches (the k
range of a q/v-only qkv) skip every low-rank load and FLOP.

The small reductions over M (dA = s dS^T x, dB = s dY_i^T S_i, the gate's d g) and the M x R
products are left to torch.mm (kernels/_fused.py): they are a few percent of the FLOPs and cuBLAS
runs them well.
Segments: several (A_i, B_i) are stacked into A_cat (R_tot x K) and a zero-padded B_cat (N x R_tot),
so q and v (and any gate pattern) are one launch.

Launch configurations are fixed per architecture (CONFIGS below), never autotuned at run time:
autotuning inside a training step costs 100 ms+ per new shape and backward cannot see forward's pick.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl


def _empty(shape, dtype, device):
    """Output allocation for every kernel; the tests swap it for a NaN-filled one (poisoning)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _overlaps(seg_ptr, num_seg, lo, hi):
    """Whether [lo, hi) meets any of the num_seg ranges [seg[2i], seg[2i+1])."""
    hit = tl.load(seg_ptr) * 0  # an int32 0 that is a tensor in both modes: the loop carries it
    for i in range(num_seg):
        s_lo = tl.load(seg_ptr + 2 * i)
        s_hi = tl.load(seg_ptr + 2 * i + 1)
        hit = hit | ((s_lo < hi) & (s_hi > lo)).to(tl.int32)
    return hit != 0


@triton.jit
def _lora_mm_kernel(
    x_ptr,  # (M, Q) left operand: x (forward) or dY (dX pass)
    w_ptr,  # (Q, P) frozen weight seen through its strides: W^T (forward) or W (dX pass)
    u_ptr,  # (Q, R) low-rank down projection, read only if FUSE_L: A_cat^T or B_cat
    l_ptr,  # (M, R) low-rank activations: read if not FUSE_L, written by column tile 0 if STORE_L
    v_ptr,  # (R, P) low-rank up projection: B_cat^T (forward) or A_cat (dX pass)
    bias_ptr,  # (P,) bias, read if HAS_BIAS
    res_ptr,  # (M, P) residual, read if HAS_RES
    out_ptr,  # (M, P) output, written exactly once per element
    pseg_ptr,  # (num_pseg, 2) int32 column ranges of P that receive the low-rank term
    qseg_ptr,  # (num_qseg, 2) int32 ranges of Q where U has non-zero rows (the L product skips the rest)
    M, Q, P, R, num_pseg, num_qseg, scale,
    stride_xm, stride_xq, stride_wq, stride_wp, stride_uq, stride_ur, stride_lm, stride_lr,
    stride_vr, stride_vp, stride_rm, stride_rp, stride_om, stride_op,
    HAS_LORA: tl.constexpr, FUSE_L: tl.constexpr, STORE_L: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks sweep the columns together so W tiles stay in L2.
    pid = tl.program_id(0)
    # (ceil-divisions by hand and tl.minimum: the tl.cdiv helpers are @jit functions of their own, which
    # the interpreter cannot call when triton was imported before TRITON_INTERPRET was set)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_p = (P + BLOCK_P - 1) // BLOCK_P
    group = GROUP_M * num_pid_p
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % group_size)
    pid_p = (pid % group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = tl.arange(0, BLOCK_Q)
    rr = tl.arange(0, BLOCK_R)
    m_mask = rm < M
    p_mask = rp < P
    r_mask = rr < R

    lora_here = False
    if HAS_LORA:
        lora_here = _overlaps(pseg_ptr, num_pseg, pid_p * BLOCK_P, pid_p * BLOCK_P + BLOCK_P)
        if STORE_L:
            lora_here = lora_here | (pid_p == 0)  # tile 0 must produce L for the caller

    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    l_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + rq
        q_mask = q < Q
        x_tile = tl.load(x_ptr + rm[:, None] * stride_xm + q[None, :] * stride_xq,
                         mask=m_mask[:, None] & q_mask[None, :], other=0.0)  # (BM, BQ)
        w_tile = tl.load(w_ptr + q[:, None] * stride_wq + rp[None, :] * stride_wp,
                         mask=q_mask[:, None] & p_mask[None, :], other=0.0)  # (BQ, BP)
        if DOT_F32:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32 anyway
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=PRECISION)
        if FUSE_L:
            if lora_here:
                if _overlaps(qseg_ptr, num_qseg, q0, q0 + BLOCK_Q):
                    u_tile = tl.load(u_ptr + q[:, None] * stride_uq + rr[None, :] * stride_ur,
                                     mask=q_mask[:, None] & r_mask[None, :], other=0.0)  # (BQ, BR)
                    if DOT_F32:
                        u_tile = u_tile.to(tl.float32)
                    l_acc = tl.dot(x_tile, u_tile, l_acc, input_precision=PRECISION)

    if HAS_LORA:
        if lora_here:
            if FUSE_L:
                l_tile = l_acc.to(x_ptr.dtype.element_ty)  # rounded like a stored M x R buffer would be
                if STORE_L:
                    if pid_p == 0:  # stored unrounded (the buffer is fp32): the gate's gradient sums it
                        tl.store(l_ptr + rm[:, None] * stride_lm + rr[None, :] * stride_lr,
                                 l_acc.to(l_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])
                v_tile = tl.load(v_ptr + rr[:, None] * stride_vr + rp[None, :] * stride_vp,
                                 mask=r_mask[:, None] & p_mask[None, :], other=0.0)  # (BR, BP)
                if DOT_F32:
                    l_tile = l_tile.to(tl.float32)
                    v_tile = v_tile.to(tl.float32)
                low = tl.dot(l_tile, v_tile, input_precision=PRECISION)
            else:
                low = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
                for r0 in range(0, R, BLOCK_R):  # any rank: BLOCK_R columns of L at a time
                    r = r0 + rr
                    l_tile = tl.load(l_ptr + rm[:, None] * stride_lm + r[None, :] * stride_lr,
                                     mask=m_mask[:, None] & (r < R)[None, :], other=0.0)
                    v_tile = tl.load(v_ptr + r[:, None] * stride_vr + rp[None, :] * stride_vp,
                                     mask=(r < R)[:, None] & p_mask[None, :], other=0.0)
                    if DOT_F32:
                        l_tile = l_tile.to(tl.float32)
                        v_tile = v_tile.to(tl.float32)
                    low = tl.dot(l_tile, v_tile, low, input_precision=PRECISION)
            acc += scale * low

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rp, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & p_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rm[:, None] * stride_rm + rp[None, :] * stride_rp,
                       mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rp[None, :] * stride_op,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# Fixed launch configurations: (BLOCK_M, BLOCK_P, BLOCK_Q, GROUP_M, num_warps, num_stages) per
# (architecture, operand class): "16-bit" (bf16, fp16), "tf32" (fp32 with
# torch.backends.cuda.matmul.allow_tf32, tensor cores) and "fp32" (fp32 without it: the dots run as
# FMA, whose operand tiles live in registers, hence the short BLOCK_Q and 8 warps). Standard GEMM
# tiles, not tuned on a GPU (none has run them yet); what they cost is compiled and checked ahead of
# time for sm_80, sm_89 and sm_90 (kernels/_aot.py, bench/results/triton-aot.csv): every launch fits
# the device's shared memory and registers without spills. Key "interpret" is for TRITON_INTERPRET=1,
# where small tiles keep the numpy emulation fast.
CONFIGS = {
    ("hopper", "16-bit"): dict(BLOCK_M=128, BLOCK_P=128, BLOCK_Q=64, GROUP_M=8, num_warps=8, num_stages=3),
    ("hopper", "tf32"): dict(BLOCK_M=128, BLOCK_P=64, BLOCK_Q=32, GROUP_M=8, num_warps=4, num_stages=3),
    ("hopper", "fp32"): dict(BLOCK_M=64, BLOCK_P=64, BLOCK_Q=16, GROUP_M=8, num_warps=8, num_stages=3),
    ("ampere", "16-bit"): dict(BLOCK_M=128, BLOCK_P=128, BLOCK_Q=32, GROUP_M=8, num_warps=8, num_stages=3),
    ("ampere", "tf32"): dict(BLOCK_M=64, BLOCK_P=64, BLOCK_Q=32, GROUP_M=8, num_warps=8, num_stages=3),
    ("ampere", "fp32"): dict(BLOCK_M=64, BLOCK_P=64, BLOCK_Q=16, GROUP_M=8, num_warps=8, num_stages=3),
    **{("interpret", c): dict(BLOCK_M=64, BLOCK_P=32, BLOCK_Q=32, GROUP_M=2, num_warps=1, num_stages=1)
       for c in ("16-bit", "tf32", "fp32")},
}
# Forward: compute x A^T inside the GEMM's K loop (True) or precompute it into an M x R buffer
# (False). Not yet measured on a GPU: bench/kernels.py's `triton` vs `triton-xa-buffer` rows decide it.
FUSE_XA = {"hopper": True, "ampere": True, "interpret": True}
# The largest total rank (all segments) whose L = X U is accumulated in the Q loop beside the main
# accumulator; above it L is precomputed (forward: the x A^T pass; dX: dY B in torch) and read back.
# Set by register pressure, from kernels/_aot.py's ptxas counts: at R 64 the fused FMA dots of plain
# fp32 spill on sm_90 and sm_80, at 16 they do not.
MAX_FUSED_RANK = {("hopper", "fp32"): 16, ("ampere", "fp32"): 16}
DEFAULT_MAX_FUSED_RANK = 64
# A launch that reads a precomputed L walks the rank BLOCK_R columns at a time: at most this many, so
# that its pipelined L and V tiles fit shared memory and the low-rank accumulator beside the main one
# fits the registers at any rank (rank 128 with BLOCK_R 128 needed 294,912 B of shared memory on
# sm_90 in tf32, over H100's 232,448 B). The x A^T pass covers the rank in column tiles of at most
# XA_BLOCK_P.
BUFFER_BLOCK_R = {"hopper": 32, "ampere": 32, "interpret": 16}
XA_BLOCK_P = {"hopper": 64, "ampere": 64, "interpret": 32}


# While planning (kernels/_aot.py): (architecture, list) -- launches are recorded there, as they would
# be made on that architecture's GPU, instead of run. None otherwise.
_plan = None


@contextlib.contextmanager
def planning(arch):
    """Within it, every launch is appended to the yielded list as (kind, grid, args, kwargs) instead of
    run, with the choices a GPU of `arch` ("hopper", "ampere") would make; call the launchers on meta
    tensors. Ahead-of-time compilation (kernels/_aot.py) compiles what a real run would launch."""
    global _plan
    _plan = (arch, [])
    try:
        yield _plan[1]
    finally:
        _plan = None


def _on_gpu(device):
    return _plan is not None or device.type == "cuda"


def _arch(device):
    if _plan is not None:
        return _plan[0]
    if device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(device)
    # The hopper tiles take up to 104 KB of shared memory per block (bench/results/triton-aot.csv) and
    # are checked for sm_90 only; every other GPU (sm_8x, and sm_100 / sm_120, whose limits the table
    # does not check) takes the ampere tiles: at most 48 KB, checked to fit sm_80 and sm_89 (99 KB).
    return "hopper" if major == 9 else "ampere"


def _operand_class(dtype):
    if dtype != torch.float32:
        return "16-bit"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def _config(device, dtype):
    return CONFIGS[(_arch(device), _operand_class(dtype))]


def _fuses(device, dtype, rank):
    """Whether L = X U is accumulated inside the launch at this total rank (else precomputed)."""
    return rank <= MAX_FUSED_RANK.get((_arch(device), _operand_class(dtype)), DEFAULT_MAX_FUSED_RANK)


def _precision(dtype, device):
    if dtype != torch.float32:
        return None if _on_gpu(device) else "ieee"  # interpreted bf16 runs as fp32: exact products
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"  # follow torch's own fp32 matmul


@functools.lru_cache(maxsize=256)
def _ranges_cached(ranges, device):
    return torch.tensor(ranges, dtype=torch.int32, device=device).reshape(-1)


def _ranges(ranges, device):
    """Segment ranges as a flat int32 device tensor, cached so a training step does no host copies."""
    return _ranges_cached(tuple(ranges) if ranges else ((0, 0),), device)


def _block_r(rank, cap=None):
    block = max(16, triton.next_power_of_2(max(rank, 1)))  # tl.dot needs K >= 16
    return block if cap is None else min(block, cap)


def _launch(x, w_t, out, *, bias=None, residual=None, u=None, l=None, v=None, rank=0, scale=1.0,
            pranges=(), qranges=(), fuse=False, store_l=False, config=None, kind="forward"):
    """C = x @ w_t (+ scale * L @ v on the pranges columns) (+ bias) (+ residual), written into out."""
    m, q = x.shape
    p = w_t.shape[1]
    if m == 0 or p == 0:
        return out
    cfg = dict(config or _config(x.device, x.dtype))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    has_lora = rank > 0
    dummy = out
    u_ = u if fuse else dummy
    l_ = l if l is not None else dummy
    v_ = v if has_lora else dummy
    res = residual if residual is not None else dummy
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"]),)
    args = (
        x, w_t, u_, l_, v_, bias.contiguous() if bias is not None else dummy, res, out,
        _ranges(pranges, x.device), _ranges(qranges, x.device),
        m, q, p, rank, len(pranges), len(qranges), float(scale),
        x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1),
        u_.stride(0) if fuse else 0, u_.stride(1) if fuse else 0,
        l_.stride(0) if l is not None else 0, l_.stride(1) if l is not None else 0,
        v_.stride(0) if has_lora else 0, v_.stride(1) if has_lora else 0,
        res.stride(0), res.stride(1), out.stride(0), out.stride(1))
    kwargs = dict(
        HAS_LORA=has_lora, FUSE_L=fuse and has_lora, STORE_L=store_l, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, BLOCK_R=_block_r(rank, None if fuse else BUFFER_BLOCK_R[_arch(x.device)]),
        PRECISION=_precision(x.dtype, x.device),
        DOT_F32=x.dtype == torch.bfloat16 and not _on_gpu(x.device),
        num_warps=num_warps, num_stages=num_stages, **cfg)
    if _plan is not None:
        _plan[1].append((kind, grid, args, kwargs))
    else:
        _lora_mm_kernel[grid](*args, **kwargs)
    return out


def stack_segments(a_list, b_list, starts, n_out):
    """A_cat (R_tot, K) and a zero-padded B_cat (N, R_tot) so that all segments are one product."""
    if len(a_list) == 1 and starts[0] == 0 and b_list[0].shape[0] == n_out:
        return a_list[0], b_list[0]
    a_cat = a_list[0] if len(a_list) == 1 else torch.cat(a_list)
    b_cat = torch.zeros(n_out, a_cat.shape[0], dtype=b_list[0].dtype, device=b_list[0].device)
    r0 = 0
    for b, start in zip(b_list, starts):
        b_cat[start:start + b.shape[0], r0:r0 + b.shape[1]] = b
        r0 += b.shape[1]
    return a_cat, b_cat


def _col_ranges(b_list, starts):
    return tuple((s, s + b.shape[0]) for b, s in zip(b_list, starts))


def lora_forward(x, weight, bias, a_list, b_list, starts, scale, residual=None):
    """y = x W^T + b + s * sum_i pad((x A_i^T) B_i^T) (+ residual) for the active segments: one launch
    (two where FUSE_XA is off for the architecture: x A^T first into an M x R buffer)."""
    m, _ = x.shape
    n_out = weight.shape[0]
    y = _empty((m, n_out), x.dtype, x.device)
    if not a_list:
        return _launch(x, weight.t(), y, bias=bias, residual=residual, kind="base")
    a_cat, b_cat = stack_segments(a_list, b_list, starts, n_out)
    rank = a_cat.shape[0]
    arch = _arch(x.device)
    fuse = FUSE_XA[arch] and _fuses(x.device, x.dtype, rank)
    l = None
    if not fuse:
        l = _launch(x, a_cat.t(), _empty((m, rank), x.dtype, x.device), config=_small_config(x, rank), kind="xa")
    return _launch(x, weight.t(), y, bias=bias, residual=residual, u=a_cat.t(), l=l, v=b_cat.t(),
                   rank=rank, scale=scale, pranges=_col_ranges(b_list, starts),
                   qranges=((0, x.shape[1]),), fuse=fuse, kind="forward" if fuse else "forward-buffer")


def _small_config(x, rank):
    """Config for an M x R product (R <= a few dozen): one narrow column tile."""
    cfg = dict(_config(x.device, x.dtype))
    cfg["BLOCK_P"] = _block_r(rank, XA_BLOCK_P[_arch(x.device)])
    return cfg


def lora_input_grad(dy, weight, a_list, b_list, starts, scale):
    """The dX pass: dX = dY W + s (dY B_cat) A_cat in one launch, with dY B accumulated in its Q loop
    and handed back as dS (M, R_tot) in fp32, straight from the accumulator. Above MAX_FUSED_RANK,
    dS is computed first, per segment in fp32 (the gate's gradient sums it), and read by the launch."""
    m, n_out = dy.shape
    k = weight.shape[1]
    a_cat, b_cat = stack_segments(a_list, b_list, starts, n_out)
    rank = a_cat.shape[0]
    dx = _empty((m, k), dy.dtype, dy.device)
    if _fuses(dy.device, dy.dtype, rank):
        ds = _empty((m, rank), torch.float32, dy.device)
        _launch(dy, weight, dx, u=b_cat, l=ds, v=a_cat, rank=rank, scale=scale, pranges=((0, k),),
                qranges=_col_ranges(b_list, starts), fuse=True, store_l=True, kind="dx")
    else:
        ds = torch.cat([dy[:, s:s + b.shape[0]].float() @ b.float() for s, b in zip(starts, b_list)], dim=1)
        _launch(dy, weight, dx, l=ds.to(dy.dtype), v=a_cat, rank=rank, scale=scale, pranges=((0, k),),
                kind="dx-buffer")
    return dx, ds
