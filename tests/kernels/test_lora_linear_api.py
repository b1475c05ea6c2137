"""The public surface: the backend switch, argument checks that speak to the user, autocast."""
import pytest
import torch

from kernels import BACKENDS, get_backend, lora_linear, resolve_backend, set_backend
from lora_cases import ON, T1, as_float64, make_case


@pytest.fixture
def restore_backend():
    old = get_backend()
    yield
    set_backend(old)


def test_backends_are_the_documented_four():
    assert BACKENDS == ("auto", "triton", "torch", "reference")


def test_set_backend_changes_the_default(restore_backend):
    set_backend("reference")
    assert get_backend() == "reference"
    assert resolve_backend() == "reference"


def test_unknown_backend_is_a_clear_error(restore_backend):
    with pytest.raises(ValueError, match="unknown kernels backend 'cuda'.*auto, triton, torch, reference"):
        set_backend("cuda")


def test_auto_is_torch_for_cpu_tensors():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", torch.device("cpu"))


def test_without_triton_auto_is_torch_and_triton_is_a_clear_error(monkeypatch):
    from kernels import _triton_path

    monkeypatch.setattr(_triton_path, "_TRITON_INSTALLED", False)
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="kernels backend 'triton' needs the triton package"):
        resolve_backend("triton", torch.device("cuda"))


def _args(case):
    return (case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], case["starts"], case["scale"])


def test_segment_outside_the_output_is_rejected():
    case = make_case(7, 40, 4)
    case["starts"] = [0, 60]  # v would end at 84 > 72
    with pytest.raises(ValueError, match=r"segment 1 writes columns \[60, 84\) outside the output width 72"):
        lora_linear(*_args(case), backend="reference")


def test_soft_gate_values_are_rejected():
    case = make_case(7, 40, 4)
    with pytest.raises(ValueError, match="hard indicators"):
        lora_linear(*_args(case), gates=[0.5, None], backend="torch")
    with pytest.raises(ValueError, match="hard indicators"):
        lora_linear(*_args(case), gates=[torch.tensor(0.5), None], backend="torch")


def test_mixed_dtypes_outside_autocast_are_rejected():
    case = make_case(7, 40, 4)
    case["lora_a"][0] = case["lora_a"][0].detach().double()
    with pytest.raises(ValueError, match="lora_a/lora_b of segment 0 is torch.float64 but x is torch.float32"):
        lora_linear(*_args(case), backend="torch")


def test_weight_and_bias_get_no_gradient():
    case = make_case(7, 40, 4)
    case["weight"].requires_grad_()
    case["bias"].requires_grad_()
    lora_linear(*_args(case), backend="torch").sum().backward()
    assert case["weight"].grad is None and case["bias"].grad is None


def test_autocast_bf16_runs_in_bf16_and_matches_reference(backend):
    case = make_case(7, 40, 8, gates=(T1, ON), residual=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora_linear(*_args(case), gates=case["gates"], residual=case["residual"], backend=backend)
    assert got.dtype == torch.bfloat16
    want = lora_linear(*_args(as_float64(case)), gates=as_float64(case)["gates"],
                       residual=as_float64(case)["residual"], backend="reference")
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
    got.float().sum().backward()
    assert case["lora_a"][0].grad.dtype == torch.float32  # the cast is differentiable: fp32 params train


def test_scale_zero_lora_is_the_plain_linear(backend):
    case = make_case(7, 40, 4)
    case["scale"] = 0.0
    y = lora_linear(*_args(case), backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(case["x"], case["weight"], case["bias"]))


@pytest.mark.parametrize("merge", [False, True])
def test_torch_path_saves_no_output_sized_tensor(monkeypatch, merge):
    """Backward memory: x, W, A, B (and, on the activation side, the M x R product x A^T), never M x N."""
    from kernels import _torch_path

    monkeypatch.setattr(_torch_path, "merge_pays", lambda *args: merge)
    case = make_case(197, 40, 8, layout="qv", d=24)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lora_linear(*_args(case), backend="torch")
    m, n = y.shape
    k, r_total = case["x"].shape[1], sum(a.shape[0] for a in case["lora_a"])
    assert all(t.shape != (m, n) for t in saved)
    expected = m * k + n * k + sum(a.numel() + b.numel() for a, b in zip(case["lora_a"], case["lora_b"])) \
        + (0 if merge else m * r_total)
    assert sum(t.numel() for t in saved) == expected


def test_merge_pays_for_vit_b_training_batches_in_fp32_only():
    from kernels._torch_path import merge_pays

    for k, n_out, rows in [(768, 2304, [768, 768]), (768, 768, [768]), (768, 3072, [3072]), (3072, 768, [768])]:
        assert merge_pays(8 * 197, k, n_out, rows, torch.float32)
        assert not merge_pays(7, k, n_out, rows, torch.float32)
        assert not merge_pays(8 * 197, k, n_out, rows, torch.bfloat16)  # rounding W + sBA would lose updates
