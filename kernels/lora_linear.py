"""The public functional `lora_linear` and the process-wide backend switch.

    y = x W^T + b (+ residual);  y[..., start_i : start_i + n_i] += g_i * s * (x A_i^T) B_i^T

Example, timm's fused qkv (embed dim D = 768) with LoRA on q and v, rank 8:
    y = lora_linear(x, qkv.weight, qkv.bias, [a_q, a_v], [b_q, b_v], [0, 2 * 768], scale=2.0)
    # x (B, 197, 768) -> y (B, 197, 2304); a_* (8, 768), b_* (768, 8); k columns [768, 1536) untouched

Backends (`--kernels`, BACKEND_TABLE below): 'reference' (plain autograd, the ground truth), 'torch'
(the CPU fast path: in-place accumulation into the base GEMM output), 'triton' (fused GPU kernels),
'auto' (Triton for CUDA tensors, torch otherwise). The backend is resolved per call from the
input's device.

Gates make selective LoRA cheap. A static gate (None, 1., or 0.) costs no read; a 0 removes its
segment from the call, so A_i and B_i are never read and no low-rank FLOPs are spent forward or
backward: the gated-block skip. So does a 0-dim tensor gate holding 0 that does not require grad,
but reading it costs a host sync on CUDA (pass Python floats where the value is static). A tensor
gate that requires grad (the straight-through gate while gates are searched) is never read on the
host: the segment is computed and its update multiplied by g on the device, and backward adds the
gate's gradient d g_i = s * sum((dY_i B_i) * (x A_i^T)) in fp32. A probe (such a gate at 0) thus
costs an active segment's FLOPs forward and backward, for a train step without host syncs.

Weight and bias are frozen: they never receive a gradient, even if they require one (they are
detached, not asserted, so that a model whose base is not yet frozen still runs).

Under autocast, the torch and triton backends cast every operand (residual too) to the autocast
dtype themselves, as autocast does for F.linear. Under torch.compile both are one registered custom
op in the graph (no graph break, with static or tensor gates); no gate is read there, so a frozen
tensor gate at 0 is computed and multiplied, not skipped. DeepSpeed ZeRO-3 gathers W only inside
its owning module's forward: call lora_linear there, with the weight passed in as an argument (as
the adapters do).
"""
import contextlib

import torch

from . import _reference, _torch_path, _triton_path
from ._backend import Segment

# name -> backend (a module's BACKEND, see _backend.py); adding a backend is its module and a line here.
BACKEND_TABLE = {
    "triton": _triton_path.BACKEND,
    "torch": _torch_path.BACKEND,
    "reference": _reference.BACKEND,
}
BACKENDS = ("auto", *BACKEND_TABLE)
_backend = "auto"
# The largest rank of one segment: what the Triton kernels are compiled and checked for, for sm_80
# and sm_90 (kernels/_aot.py, tests/kernels/test_triton_aot.py). adapters refuse a larger lora_rank
# when the run is configured; lora_linear refuses it before any work.
MAX_RANK = 256


def set_backend(name):
    """Set the process-wide default backend (the engine calls this from `--kernels`)."""
    global _backend
    _backend = _check_name(name)


def get_backend():
    """The current process-wide setting, possibly 'auto'."""
    return _backend


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}: expected one of {', '.join(BACKENDS)} "
                         f"(set it with --kernels or kernels.set_backend)")
    return name


def resolve_backend(name=None, device=None):
    """The concrete backend for a call: 'auto' is Triton for CUDA tensors, the torch path otherwise.

    `device` is the input's device (None: judge by whether CUDA exists at all). A backend that cannot
    run there is a clear error (asking for 'triton' on a CPU tensor is only allowed when
    TRITON_INTERPRET=1: the tests run the kernels that way).
    """
    name = _check_name(get_backend() if name is None else name)
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if name == "auto":
        return "triton" if on_cuda and BACKEND_TABLE["triton"].unavailable(on_cuda) is None else "torch"
    reason = BACKEND_TABLE[name].unavailable(on_cuda)
    if reason is not None:
        raise ValueError(f"kernels backend {name!r} {reason}")
    return name


def _segments(weight, lora_a, lora_b, starts, gates):
    """Validate the per-segment lists and drop the statically gated-off segments."""
    n_out, k = weight.shape
    if not (len(lora_a) == len(lora_b) == len(starts)):
        raise ValueError(f"lora_linear: lora_a, lora_b and starts must have one entry per segment, "
                         f"got {len(lora_a)}, {len(lora_b)}, {len(starts)}")
    if gates is None:
        gates = [None] * len(lora_a)
    if len(gates) != len(lora_a):
        raise ValueError(f"lora_linear: gates must have one entry per segment ({len(lora_a)}), got {len(gates)}")
    segs = []
    for i, (a, b, start, g) in enumerate(zip(lora_a, lora_b, starts, gates)):
        r = a.shape[0]
        if a.dim() != 2 or a.shape[1] != k or b.dim() != 2 or b.shape[1] != r:
            raise ValueError(f"lora_linear: segment {i} expects A (R, {k}) and B (n, R), got A {tuple(a.shape)} "
                             f"and B {tuple(b.shape)}")
        if r > MAX_RANK:
            raise ValueError(f"lora_linear: segment {i} has rank {r}, above {MAX_RANK}, the largest rank the "
                             f"kernels are compiled and checked for (kernels/_aot.py)")
        start = int(start)
        if start < 0 or start + b.shape[0] > n_out:
            raise ValueError(f"lora_linear: segment {i} writes columns [{start}, {start + b.shape[0]}) "
                             f"outside the output width {n_out}")
        if isinstance(g, torch.Tensor):
            if g.dim() != 0:
                raise ValueError(f"lora_linear: gate {i} must be a 0-dim tensor, got shape {tuple(g.shape)}")
            segs.append(Segment(a, b, start, g))
            continue
        g = 1.0 if g is None else float(g)
        if g not in (0.0, 1.0):
            raise ValueError(f"lora_linear: gate {i} is {g}; gates are hard indicators, 0. or 1.")
        if g == 1.0:
            segs.append(Segment(a, b, start))
    return segs


def lora_linear(x, weight, bias, lora_a, lora_b, starts, scale, gates=None, residual=None, backend=None):
    """y = x W^T + b + sum_i g_i * s * (x A_i^T) B_i^T on columns [starts[i], starts[i] + n_i) (+ residual).

    x (..., K); weight (N, K) frozen; bias (N,) or None; lora_a[i] (R_i, K); lora_b[i] (n_i, R_i);
    gates: None or one entry per segment of None / 0. / 1. / 0-dim tensor (may require grad);
    residual: None or a tensor of y's shape. Returns y (..., N).
    """
    k = x.shape[-1]
    n_out = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"lora_linear: weight must be (N, {k}) for x (..., {k}), got {tuple(weight.shape)}")
    segs = _segments(weight, lora_a, lora_b, starts, gates)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # (M, K)
    res2 = None
    if residual is not None:
        if residual.shape != (*lead, n_out):
            raise ValueError(f"lora_linear: residual must have y's shape {(*lead, n_out)}, got {tuple(residual.shape)}")
        res2 = residual.reshape(-1, n_out)
    name = resolve_backend(backend, x.device)
    impl = BACKEND_TABLE[name]
    if impl.casts_operands:
        x2, weight, bias, segs, res2 = _match_dtypes(x2, weight, bias, segs, res2)
    # Under autocast the operands are cast already (_match_dtypes): keep it so inside.
    autocast_off = impl.casts_operands and torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if autocast_off else contextlib.nullcontext():
        return impl(x2, weight, bias, segs, scale, res2).reshape(*lead, n_out)


def _match_dtypes(x, weight, bias, segs, residual):
    """Under autocast, cast every operand to the autocast dtype (as autocast does for F.linear, since
    custom ops and in-place accumulation bypass it); otherwise insist that the dtypes agree."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
        segs = [Segment(cast(s.a), cast(s.b), s.start, s.gate) for s in segs]
        return cast(x), cast(weight), cast(bias), segs, cast(residual)
    named = [("weight", weight), ("bias", bias), ("residual", residual)]
    named += [(f"lora_a/lora_b of segment {i}", t) for i, s in enumerate(segs) for t in (s.a, s.b)]
    for what, t in named:
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"lora_linear: {what} is {t.dtype} but x is {x.dtype}; cast them to one dtype "
                             f"or run under torch.autocast")
    return x, weight, bias, segs, residual
