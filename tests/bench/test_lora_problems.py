"""The kernel benchmark's providers compute what they claim: HF peft's LoRA Linear (in the peer
worker) matches our op where the work is the same, and the FLOP counts are the closed forms of that work."""
import importlib.util

import pytest
import torch

from bench import lora_problems as lp
from bench import peers

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


@needs_peft
@pytest.mark.parametrize("shape", ["proj", "fc1", "fc2"])
def test_hf_peft_computes_our_forward_and_gradients(shape):
    p = lp.build_problem(shape, 1, 4, "fp64", "cpu")
    peft = peers.shared().lora_outputs(lp.hf_peft_layer(p))  # y and the gradients of x, A, B, from the worker
    assert peft["class"] == "peft.tuners.lora.layer.Linear" and peft["base_frozen"]
    y_ours = lp.forward_fn(p, "torch")()
    grads_ours = torch.autograd.grad(y_ours, [p.x, p.lora_a[0], p.lora_b[0]], p.dy)
    torch.testing.assert_close(peft["y"], y_ours, rtol=1e-12, atol=1e-12)
    for got, want in zip((peft["dx"], peft["da"], peft["db"]), grads_ours):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_peft
def test_hf_peft_on_qkv_wraps_the_whole_layer():
    p = lp.build_problem("qkv", 1, 4, "fp64", "cpu")
    peft = peers.shared().lora_outputs(lp.hf_peft_layer(p))
    assert peft["lora_b_shape"] == [p.n, p.r]  # every column of q, k, v
    b = torch.zeros(p.n, p.r, dtype=p.dtype)  # the segments' rows of B, zeros on k
    for (start, width), b_i in zip(p.segments, p.lora_b):
        b[start:start + width] = b_i.detach()
    want = torch.nn.functional.linear(p.x, p.weight, p.bias) + p.scale * (p.x @ p.lora_a[0].T) @ b.T
    torch.testing.assert_close(peft["y"], want, rtol=1e-12, atol=1e-12)
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
