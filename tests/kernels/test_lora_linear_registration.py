"""The Triton op is a well-formed torch.library custom op: fake tensors, autograd, torch.compile."""
import pytest
import torch

import kernels
from lora_cases import ON, T1, make_case


def _call(case, backend):
    return kernels.lora_linear(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                               case["starts"], case["scale"], gates=case["gates"], residual=case["residual"],
                               backend=backend)


def test_custom_op_passes_opcheck(triton_poisoned):
    case = make_case(7, 40, 4, residual=True)
    args = (case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], case["starts"],
            case["scale"], [], [], case["residual"])
    torch.library.opcheck(torch.ops.kernels.lora_linear_triton.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_compiled_call_matches_eager(triton_poisoned, backend_name):
    case = make_case(7, 40, 4, residual=True)
    eager = _call(case, backend_name)
    compiled = torch.compile(lambda: _call(case, backend_name), backend="aot_eager", fullgraph=True)
    y = compiled()
    torch.testing.assert_close(y, eager)
    y.backward(case["dy"])
    assert case["lora_a"][0].grad is not None and case["x"].grad is not None


def test_tensor_gates_compile_through_the_fused_op(triton_poisoned):
    case = make_case(7, 40, 4, gates=(T1, ON))
    want = _call(case, "reference")
    y = torch.compile(lambda: _call(case, "triton"), backend="aot_eager", fullgraph=True)()
    torch.testing.assert_close(y, want)
