"""Gates that require grad stay on the device: a train step with them reads no tensor on the host.

Selective LoRA hands lora_linear one 0-dim gate per segment, `hard + (score - score.detach())`, that
requires grad while the gates are searched. Reading it (`float()`, `.item()`, `bool()`, ...) would
be a host-device sync on CUDA in every layer of every step; instead its value multiplies the update
on the device, and the price is that a probe (g = 0) costs an active segment's FLOPs.
"""
import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lora_cases import ON, T0, T1, as_float64, assert_close_to_reference, grad_inputs, make_case, run

HOST_READS = ("item", "__float__", "__bool__", "__int__", "tolist")


def _forbidden(name):
    def read(self, *args, **kwargs):
        raise AssertionError(f"Tensor.{name} was called: a host read of a tensor")
    return read


@contextlib.contextmanager
def no_host_reads():
    """Any of HOST_READS on a tensor raises inside."""
    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, _forbidden(name))
        yield


def test_the_guard_catches_a_host_read():
    with no_host_reads(), pytest.raises(AssertionError, match="Tensor.__float__ was called"):
        float(torch.tensor(1.0))


GATES = [(T1, T0), (T0, T0), (T1, ON)]  # probes, and a device gate beside a static one
# the torch path's two sides (merge_pays forced either way) and the interpreted Triton kernels
PATHS = {"torch-activation-side": False, "torch-weight-side": True, "triton": None}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("gates", GATES, ids=["-".join(g) for g in GATES])
def test_requiring_grad_gates_are_not_read_and_match_reference(request, monkeypatch, path, gates):
    from kernels import _torch_path

    if path == "triton":
        request.getfixturevalue("triton_poisoned")
    else:
        monkeypatch.setattr(_torch_path, "merge_pays", lambda *args: PATHS[path])
    case = make_case(33, 40, 8, layout="qv", gates=gates, residual=True)
    with no_host_reads():
        got = run(case, path.split("-")[0])  # forward and backward
    assert_close_to_reference(case, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gate_gradient_of_16_bit_inputs_is_summed_in_fp32(backend, dtype):
    # seed 2: gate 1's sum cancels to about 1% of its terms; summed in 16 bits it is 2-10% off, in
    # fp32 within 1e-5 of float64 (the 16-bit inputs are exact in both)
    case = make_case(197, 40, 16, layout="qv", gates=(T1, T0), dtype=dtype, seed=2)
    with no_host_reads():
        got = run(case, backend)
    assert_close_to_reference(case, got)
    want = run(as_float64(case), "reference")
    for name, a, b in zip(["y"] + grad_inputs(case)[0], got, want):
        if name.startswith("dgate"):
            assert a.dtype == torch.float32
            assert abs(a.double() - b).item() < 1e-4 * abs(b).item(), name


def _fwd_bwd_flops(case, backend):
    with FlopCounterMode(display=False) as counter:
        run(case, backend)
    return counter.get_total_flops()


@pytest.mark.parametrize("layout", ["qv", "full"])
def test_a_probe_costs_what_an_active_segment_costs(any_backend, layout):
    """The documented price of no host reads: g = 0 with a gate that requires grad is computed."""
    flops = {gates: _fwd_bwd_flops(make_case(65, 40, 8, layout=layout, gates=gates), any_backend)
             for gates in [(ON, ON), (T1, T0), (T0, T0)]}
    assert flops[(T1, T0)] == flops[(T0, T0)] == flops[(ON, ON)]
