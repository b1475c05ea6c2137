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
