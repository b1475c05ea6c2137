"""Activation checkpointing (timm's `set_grad_checkpointing`) with every strategy: the recompute in
backward gives the gradients of the plain backward, through the same fused-LoRA backend, and
frozen prefix blocks keep nothing.

Tolerance: fp32 gradients equal to 1e-6 relative (the recompute runs the same ops on the same
inputs; in practice they come out bit-identical)."""
import gc
import importlib
import weakref

import pytest
import torch

import adapters
from adapter_helpers import cfg, images, randomize_b, tiny_vit

lora_linear_mod = importlib.import_module("kernels.lora_linear")  # the package re-exports a function of that name

STRATEGIES = {  # name -> AdapterConfig options
    "full": {}, "top_k": {"top_k": 2}, "linear": {}, "lora": {"lora_targets": "q,v,fc1", "lora_dropout": 0.1},
    "block_expansion": {"blocks": 2}, "selective_lora": {"sparsity_lambda": 0.5, "penalty_warmup": 0.0},
}


def build(name, backend, depth, checkpointing, **options):
    torch.manual_seed(0)  # the same backbone and LoRA A both times
    strategy = adapters.get_strategy(name, cfg(**{**STRATEGIES[name], **options}))
    model = adapters.use_kernels(strategy.apply(tiny_vit(depth=depth), 10), backend)
    randomize_b(model)  # B = 0 at init would leave dA = 0
    if name == "selective_lora":  # one gate off: its straight-through probe path runs too
        with torch.no_grad():
            model.blocks[1].attn.qkv.lora_score["v"].fill_(0.05)
    model.set_grad_checkpointing(checkpointing)
    return strategy, model.train()


def pair(name, backend="torch", depth=4, **options):
    """The strategy applied to the same tiny ViT twice, without and with checkpointing: (strategy,
    model) each (a strategy knows its own model's modules: selective LoRA's penalty reads them)."""
    return build(name, backend, depth, False, **options), build(name, backend, depth, True, **options)


def loss_and_grads(strategy, model, seed=0):
    torch.manual_seed(seed)  # LoRA dropout draws the same masks (checkpoint replays the RNG state)
    x, y = images(4), torch.arange(4)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    extra = strategy.extra_loss(model, 1, 10)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name, backend", [(name, "torch") for name in STRATEGIES]
                         + [("lora", "reference"), ("selective_lora", "reference")])
def test_checkpointing_gives_the_gradients_of_the_plain_backward(name, backend):
    plain, checkpointed = pair(name, backend)
    loss, grads = loss_and_grads(*plain)
    loss_ckpt, grads_ckpt = loss_and_grads(*checkpointed)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and grads
    for n, g in grads.items():
        assert g is not None and grads_ckpt[n] is not None, n
        torch.testing.assert_close(grads_ckpt[n], g, rtol=1e-6, atol=1e-7, msg=n)
    if name == "selective_lora":
        assert any(".lora_score." in n and g.abs().sum() > 0 for n, g in grads.items())


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_the_recompute_calls_the_same_fused_lora_backend(monkeypatch, backend):
    calls = []
    resolve = lora_linear_mod.resolve_backend  # called once per fused-op call, to pick its backend

    def spy(*args, **kwargs):
        calls.append(resolve(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(lora_linear_mod, "resolve_backend", spy)
    plain, checkpointed = pair("lora", backend)
    loss_and_grads(*plain)
    calls_plain = len(calls)
    loss_and_grads(*checkpointed)
    assert calls_plain == 4 * 2  # 4 blocks x (qkv, fc1)
    assert len(calls) - calls_plain == 2 * calls_plain  # forward, then the recompute in backward
    assert set(calls) == {backend}


def alive_saved_bytes(model) -> int:
    """Bytes of the tensors autograd still holds for backward at the end of the forward (parameters
    excluded, each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            packed.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(images(4)).logsumexp(-1).mean()
    gc.collect()
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in packed) if t is not None}
    loss.backward()
    return sum(alive.values())


@pytest.mark.parametrize("name, options", [("top_k", {"top_k": 2}), ("block_expansion", {"blocks": 1})])
def test_frozen_prefix_blocks_keep_no_activations_under_checkpointing(name, options):
    """The same trained top on a 4- and an 8-block model: the four extra frozen blocks add nothing."""
    shallow = build(name, "torch", 4, True, **options)[1]
    deep = build(name, "torch", 8, True, **options)[1]
    assert alive_saved_bytes(deep) == alive_saved_bytes(shallow) > 0


def test_checkpointing_keeps_fewer_activations():
    (_, model), (_, checkpointed) = pair("full")
    assert alive_saved_bytes(checkpointed) < alive_saved_bytes(model) / 3
