"""Random cases for lora_linear and the comparison with the float64 reference, shared by the kernel tests."""
import math

import torch

import kernels

# gate kinds, per segment: static on / static off / tensor gates (straight-through) / a frozen tensor 0
ON, OFF, T1, T0, T0_FROZEN = "on", "off", "t1", "t0", "t0-frozen"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def make_case(m, k, r, layout="qv", gates=(ON, ON), bias=True, residual=False, dtype=torch.float32,
              d=24, n_full=50, lead=None, seed=0, device="cpu"):
    """One random problem. layout 'qv': timm's fused qkv of width 3d with LoRA on q and v (starts
    [0, 2d]); 'full': one segment over all n_full columns. lead: leading dims of x (default (m,))."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    if layout == "qv":
        n_out, seg_widths, starts = 3 * d, [d, d], [0, 2 * d]
    else:
        n_out, seg_widths, starts = n_full, [n_full], [0]
        gates = gates[:1]
    lead = (m,) if lead is None else lead
    case = dict(
        x=rand(*lead, k).requires_grad_(),
        weight=rand(n_out, k, std=k ** -0.5),
        bias=rand(n_out) if bias else None,
        lora_a=[rand(r, k, std=k ** -0.5).requires_grad_() for _ in seg_widths],
        lora_b=[rand(w, r).requires_grad_() for w in seg_widths],  # non-zero B: the update is visible
        starts=starts,
        scale=2.0 / math.sqrt(r),
        gates=[_gate(kind, device) for kind in gates],
        residual=rand(*lead, n_out).requires_grad_() if residual else None,
    )
    case["dy"] = rand(*lead, n_out)
    return case


def _gate(kind, device):
    if kind == ON:
        return None
    if kind == OFF:
        return 0.0
    return torch.tensor(1.0 if kind == T1 else 0.0, device=device, requires_grad=kind != T0_FROZEN)


def grad_inputs(case):
    """Names and tensors whose gradients the op must produce (or leave None)."""
    named = [("dx", case["x"])]
    named += [(f"dA{i}", a) for i, a in enumerate(case["lora_a"])]
    named += [(f"dB{i}", b) for i, b in enumerate(case["lora_b"])]
    named += [(f"dgate{i}", gt) for i, gt in enumerate(case["gates"])
              if isinstance(gt, torch.Tensor) and gt.requires_grad]
    if case["residual"] is not None:
        named.append(("dresidual", case["residual"]))
    return [n for n, _ in named], [t for _, t in named]


def as_float64(case):
    """The same case in float64 (from the already rounded values), fresh leaves."""
    def cast(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to(torch.float64).requires_grad_(t.requires_grad)
    out = {}
    for key, val in case.items():
        out[key] = [cast(v) for v in val] if isinstance(val, list) else cast(val)
    out["starts"] = case["starts"]
    return out


def run(case, backend):
    """y and the gradients of grad_inputs (None where the op must not produce one)."""
    y = kernels.lora_linear(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                            case["starts"], case["scale"], gates=case["gates"], residual=case["residual"],
                            backend=backend)
    grads = torch.autograd.grad(y, grad_inputs(case)[1], case["dy"].to(y.dtype), allow_unused=True)
    return [y.detach(), *grads]


def assert_matches_reference(case, backend, tol=None):
    """Forward and every gradient within a norm-wise relative error of the float64 reference."""
    assert_close_to_reference(case, run(case, backend), tol)


def assert_close_to_reference(case, got, tol=None):
    """`got` (what run(case, ...) returned) against the float64 reference, as assert_matches_reference."""
    tol = TOL[case["x"].dtype] if tol is None else tol
    want = run(as_float64(case), "reference")
    names = ["y"] + grad_inputs(case)[0]
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, f"{name}: expected no gradient (skipped segment), got one"
            continue
        assert a is not None, f"{name}: gradient missing"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert not torch.isnan(a).any(), f"{name}: NaN (an element was never written)"
        a64 = a.double()
        ref_norm = b.norm().item()
        if ref_norm == 0.0:
            assert a64.abs().max().item() == 0.0, f"{name}: expected exact zeros"
            continue
        rel = ((a64 - b).norm() / ref_norm).item()
        assert rel < tol, f"{name}: relative error {rel:.2e} >= {tol:.0e}"
