"""A gate of 0 costs nothing: A and B are never read, no low-rank FLOPs forward or backward.

NaN in A and B would poison any product they took part in, so an exact plain-linear result proves
they were not read; FlopCounterMode proves no low-rank FLOPs were spent (the Triton op is counted by
its registered formula, the others by their aten matmuls).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import kernels
from kernels._torch_path import merge_pays
from lora_cases import OFF, ON, T0_FROZEN, make_case

def _nan_lora(case, segments):
    for i in segments:
        case["lora_a"][i] = torch.full_like(case["lora_a"][i], float("nan")).requires_grad_()
        case["lora_b"][i] = torch.full_like(case["lora_b"][i], float("nan")).requires_grad_()


def _call(case, backend):
    return kernels.lora_linear(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                               case["starts"], case["scale"], gates=case["gates"], residual=case["residual"],
                               backend=backend)


@pytest.mark.parametrize("gate", [OFF, T0_FROZEN])
def test_gate_zero_reads_no_lora_weights_and_equals_plain_linear(any_backend, gate):
    case = make_case(197, 40, 8, layout="qv", gates=(gate, gate))
    _nan_lora(case, [0, 1])
    y = _call(case, any_backend)
    x2 = case["x"].detach().clone().requires_grad_()
    y_plain = F.linear(x2, case["weight"], case["bias"])
    assert torch.equal(y, y_plain)
    y.backward(case["dy"])
    y_plain.backward(case["dy"])
    assert torch.equal(case["x"].grad, x2.grad)
    assert all(t.grad is None for t in case["lora_a"] + case["lora_b"])


def test_gated_off_q_block_is_not_read_while_v_trains(any_backend):
    case = make_case(197, 40, 8, layout="qv", gates=(OFF, ON), residual=True)
    v_only = dict(case, lora_a=case["lora_a"][1:], lora_b=case["lora_b"][1:], starts=case["starts"][1:],
                  gates=[None])
    want = _call(v_only, "reference")
    _nan_lora(case, [0])
    got = _call(case, any_backend)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward(case["dy"])
    assert case["lora_a"][0].grad is None and case["lora_b"][0].grad is None
    assert not torch.isnan(case["lora_a"][1].grad).any() and not torch.isnan(case["x"].grad).any()


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("gates", [(OFF, OFF), (T0_FROZEN, OFF)])
def test_gate_zero_flops_equal_plain_linear_forward_and_backward(any_backend, gates):
    case = make_case(197, 40, 8, layout="qv", gates=gates)
    plain = _flops(lambda: F.linear(case["x"], case["weight"], case["bias"]).backward(case["dy"]))
    assert _flops(lambda: _call(case, any_backend).backward(case["dy"])) == plain


@pytest.mark.parametrize("gates", [(ON, ON), (ON, OFF)])
@pytest.mark.parametrize("layout", ["qv", "full"])
def test_forward_flops_are_base_plus_low_rank_of_active_segments(any_backend, layout, gates):
    m, k, r = 197, 40, 8
    case = make_case(m, k, r, layout=layout, gates=gates)
    n_out = case["weight"].shape[0]
    rows = [b.shape[0] for b, g in zip(case["lora_b"], case["gates"]) if g is None]
    want = 2 * m * k * n_out
    if any_backend == "torch" and merge_pays(m, k, n_out, rows, case["x"].dtype):
        want += sum(2 * n * r * k for n in rows)  # the update folded into W's rows: s B A, n x K
    else:  # the k range of the qkv costs nothing: 2MKR + 2MRn with n the segment's width
        want += sum(2 * m * k * r + 2 * m * r * n for n in rows)
    with torch.no_grad():
        assert _flops(lambda: _call(case, any_backend)) == want
