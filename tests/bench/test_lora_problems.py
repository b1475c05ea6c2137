"""The kernel benchmark's providers compute what they claim: HF peft's LoRA Linear matches our op
where the work is the same, and the FLOP counts are the closed forms of that work."""
import pytest
import torch

from bench import lora_problems as lp


@pytest.mark.parametrize("shape", ["proj", "fc1", "fc2"])
def test_hf_peft_computes_our_forward_and_gradients(shape):
    pytest.importorskip("peft")
    p = lp.build_problem(shape, 1, 4, "fp64", "cpu")
    layer = lp.hf_peft_lora(p)
    assert type(layer).__module__ == "peft.tuners.lora.layer" and type(layer).__name__ == "Linear"
    peft_a, peft_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    y_peft = layer(p.x)
    grads_peft = torch.autograd.grad(y_peft, [p.x, peft_a, peft_b], p.dy)
    y_ours = lp.forward_fn(p, "torch")()
    grads_ours = torch.autograd.grad(y_ours, [p.x, p.lora_a[0], p.lora_b[0]], p.dy)
    assert not any(t.requires_grad for t in (layer.base_layer.weight, layer.base_layer.bias))
    torch.testing.assert_close(y_peft, y_ours, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_peft, grads_ours):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hf_peft_on_qkv_wraps_the_whole_layer():
    pytest.importorskip("peft")
    p = lp.build_problem("qkv", 1, 4, "fp64", "cpu")
    layer = lp.hf_peft_lora(p)
    assert layer.lora_B["default"].weight.shape == (p.n, p.r)  # every column of q, k, v
    assert lp.work_segments(p, "hf-peft") == ((0, p.n),) and lp.work_note(p, "hf-peft") == lp.DIFFERENT_WORK
    assert lp.work_note(p, "torch") == "" and lp.work_note(lp.build_problem("proj", 1, 4, "fp64", "cpu"), "hf-peft") == ""


@pytest.mark.parametrize("shape", list(lp.SHAPES))
def test_flop_counts_are_the_closed_forms(shape):
    p = lp.build_problem(shape, 2, 8, "fp32", "cpu")
    m, k, n, r = p.m, p.k, p.n, p.r
    widths = [w for _, w in p.segments]
    forward = 2 * m * k * n + sum(2 * m * k * r + 2 * m * r * w for w in widths)
    backward = 2 * m * n * k + sum(4 * m * w * r + 4 * m * r * k for w in widths)  # dX, dB, dS, dA, dS A
    assert lp.useful_flops(p, "torch", "forward") == forward
    assert lp.useful_flops(p, "peft-style", "backward") == backward
    assert lp.useful_flops(p, "reference", "full") == forward + backward
    assert lp.useful_flops(p, "linear", "full") == lp.useful_flops(p, "torch-g0", "full") == 4 * m * k * n
    peft_width = [n] if shape == "qkv" else widths
    assert lp.useful_flops(p, "hf-peft", "forward") == 2 * m * k * n + sum(2 * m * k * r + 2 * m * r * w
                                                                          for w in peft_width)


def test_every_provider_here_computes_the_reference_output():
    p = lp.build_problem("qkv", 1, 4, "fp64", "cpu")
    want = lp.forward_fn(p, "reference")()
    for provider in set(lp.available_providers("cpu")) - {"hf-peft", "linear", "torch-g0", "reference"}:
        torch.testing.assert_close(lp.forward_fn(p, provider)(), want, rtol=1e-12, atol=1e-12)
    base = torch.nn.functional.linear(p.x, p.weight, p.bias)
    torch.testing.assert_close(lp.forward_fn(p, "torch-g0")(), base, rtol=0, atol=0)
