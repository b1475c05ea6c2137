"""Selective LoRA: TAPS gates (hard forward, straight-through backward), sparsity penalty, budget mode,
the gated-block skip once gates are fixed, and finalisation to the base model's exact FLOPs."""
import copy
import re

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import adapters.lora as lora_mod
import kernels
from adapters import GatedLoRALinear, get_strategy, trainable_parameter_count
from engine.config import AdapterConfig
from adapter_helpers import cfg, images, sgd_steps, tiny_vit, randomize_b


def selective_vit(seed=0, **options):
    model = tiny_vit(seed=seed)
    strategy = get_strategy("selective_lora", cfg(**options))
    return strategy.apply(model, 10).eval(), strategy




def set_scores(strategy, scores: dict):
    with torch.no_grad():
        for name, value in scores.items():
            module, seg = strategy._gates[name]
            module.lora_score[seg].fill_(value)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_defaults_follow_taps():
    defaults = AdapterConfig()
    assert (defaults.gate_threshold, defaults.gate_init) == (0.1, 0.15)
    assert 0 < defaults.penalty_warmup < 1 and defaults.sparsity_lambda > 0
    model, strategy = selective_vit()
    assert list(strategy._scores().values()) == pytest.approx([0.15] * 8)
    assert strategy.metrics(model) == {"active_blocks": 8, "total_blocks": 8}


def test_one_gated_lora_block_per_targeted_projection_per_block():
    model, strategy = selective_vit(lora_targets="q,k,v,proj,fc1,fc2")
    assert strategy.metrics(model)["total_blocks"] == 4 * 6
    assert list(strategy._gates)[:7] == ["0.q", "0.k", "0.v", "0.proj", "0.fc1", "0.fc2", "1.q"]
    assert isinstance(model.blocks[0].attn.qkv, GatedLoRALinear)
    # LoRA's parameters plus one score per LoRA block.
    lora_params = 4 * 8 * (3 * 128 + 128 + 320 + 320)
    assert trainable_parameter_count(model) == lora_params + 24 + 64 * 10 + 10


def gated_qkv(score_q=0.15, score_v=0.15, seed=0):
    torch.manual_seed(seed)
    module = GatedLoRALinear(nn.Linear(16, 48), {"q": (0, 16), "v": (32, 16)}, rank=4, alpha=4.0,
                             threshold=0.1, score_init=0.15)
    with torch.no_grad():
        for b in module.lora_b.values():
            b.normal_()
        module.lora_score["q"].fill_(score_q)
        module.lora_score["v"].fill_(score_v)
    return module


def test_forward_uses_the_hard_indicator_of_the_score():
    x = torch.randn(5, 16)
    on = gated_qkv(score_q=0.1)(x)  # score >= threshold: on, whatever its size
    assert torch.equal(on, gated_qkv(score_q=3.0)(x))
    off = gated_qkv(score_q=0.0999)(x)
    without_q = gated_qkv()
    with torch.no_grad():
        without_q.lora_b["q"].zero_()
    assert torch.allclose(off, without_q(x), atol=1e-6, rtol=0)
    assert not torch.allclose(off, on, atol=1e-3)


@pytest.fixture(params=["torch", "reference"])
def backend(request):
    previous = kernels.get_backend()
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(previous)


@pytest.mark.parametrize("score_q", [0.15, 0.05], ids=["active", "inactive"])
def test_backward_passes_the_gate_gradient_straight_through_to_the_score(score_q, backend):
    module = gated_qkv(score_q=score_q)
    x, w = torch.randn(5, 16), torch.randn(5, 48)
    (module(x) * w).sum().backward()
    a, b = module.lora_a["q"].detach(), module.lora_b["q"].detach()
    expected = ((w[:, 0:16] @ b) * (x @ a.t())).sum() * module.scale  # dL/dg_q = s * sum((dY_q B) * (x A^T))
    assert torch.allclose(module.lora_score["q"].grad, expected, rtol=1e-5, atol=1e-6)


def test_sparsity_penalty_is_lambda_times_mean_abs_score_after_the_warm_up():
    model, strategy = selective_vit(sparsity_lambda=0.5, penalty_warmup=0.25)
    set_scores(strategy, {"0.q": -0.3, "3.v": 0.7})
    assert strategy.extra_loss(model, 24, 100) is None
    penalty = strategy.extra_loss(model, 25, 100)
    expected = 0.5 * (0.3 + 0.7 + 6 * 0.15) / 8
    assert penalty.item() == pytest.approx(expected)
    penalty.backward()
    assert strategy._gates["0.q"][0].lora_score["q"].grad.item() == pytest.approx(-0.5 / 8)


def test_zero_lambda_adds_no_loss():
    model, strategy = selective_vit(sparsity_lambda=0.0)
    assert strategy.extra_loss(model, 99, 100) is None


def test_taps_mode_keeps_the_gates_live_during_training():
    model, strategy = selective_vit()
    sgd_steps(model, steps=3, strategy=strategy)
    assert strategy.state()["fixed"] is False
    assert all(m.lora_score[seg].requires_grad for m, seg in strategy._gates.values())


def test_budget_mode_fixes_the_top_k_scores_when_the_search_ends():
    model, strategy = selective_vit(active_blocks=3, search_fraction=0.5)
    set_scores(strategy, {"0.q": 0.9, "1.v": 0.05, "2.q": 0.4, "3.v": 0.3, "3.q": 0.2})
    strategy.on_step(model, 4, 10)  # still searching (5 of 10 steps)
    assert strategy.state()["fixed"] is False
    strategy.on_step(model, 5, 10)
    assert strategy.state()["fixed"] is True
    assert set(strategy.state()["active"]) == {"0.q", "2.q", "3.v"}
    assert strategy.metrics(model) == {"active_blocks": 3, "total_blocks": 8}


@pytest.mark.parametrize("fraction, k", [(0.25, 2), (0.3, 2), (0.5, 4), (1.0, 8), (0.01, 1)])
def test_active_fraction_sets_k_as_a_rounded_share_of_the_blocks(fraction, k):
    model, strategy = selective_vit(active_fraction=fraction)
    strategy.on_step(model, 10, 10)
    assert strategy.metrics(model)["active_blocks"] == k


def test_budget_training_ends_with_exactly_k_blocks_and_trains_only_those_after_the_search():
    model, strategy = selective_vit(active_blocks=2, search_fraction=0.5, sparsity_lambda=0.0)
    sgd_steps(model, steps=2, strategy=strategy)  # the search: on_step(2, 2) fixes the gates
    fixed = copy.deepcopy(model.state_dict())
    active = set(strategy.state()["active"])
    sgd_steps(model, steps=2, strategy=strategy, seed=2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, fixed[k])}
    blocks = {f"{k.split('.')[1]}.{k.rsplit('.', 1)[1]}" for k in changed if ".lora_" in k}
    assert strategy.metrics(model)["active_blocks"] == 2
    assert blocks == active
    assert not any(".lora_score." in k for k in changed)


def test_inactive_blocks_are_skipped_once_gates_are_fixed(monkeypatch):
    model, strategy = selective_vit()
    strategy.fix_gates({"1.v"})
    calls = []
    real = lora_mod.lora_linear
    monkeypatch.setattr(lora_mod, "lora_linear", lambda *a, **k: calls.append((len(a[3]), k["gates"])) or real(*a, **k))
    model.train()(images()).sum().backward()
    assert calls == [(0, None), (1, None), (0, None), (0, None)]  # not passed at all, not gated by zero
    inactive = [p for n, p in model.named_parameters() if ".lora_" in n and not n.startswith("blocks.1.attn.qkv.")]
    assert all(p.grad is None and not p.requires_grad for p in inactive)


def test_a_training_step_with_every_gate_fixed_off_costs_what_linear_probing_costs():
    x = images()
    model, strategy = selective_vit()
    strategy.fix_gates(set())
    probe = get_strategy("linear", cfg()).apply(tiny_vit(), 10)
    assert flops(lambda: model.train()(x).sum().backward()) == flops(lambda: probe.train()(x).sum().backward())


@pytest.mark.parametrize("rank", [2, 16])
def test_finalized_model_has_exactly_the_base_models_inference_flops(rank):
    x = images()
    model, strategy = selective_vit(lora_rank=rank, lora_targets="q,v,fc1")
    randomize_b(model)
    gated_flops = flops(lambda: model(x))
    final = strategy.finalize(model)
    base = tiny_vit()
    assert flops(lambda: final(x)) == flops(lambda: base(x)) < gated_flops


def test_finalized_logits_equal_the_gated_model():
    x = images()
    model, strategy = selective_vit(lora_targets="q,v,fc2")
    randomize_b(model)
    set_scores(strategy, {"0.q": 0.0, "1.fc2": 0.05, "2.v": -1.0})
    expected = model(x)
    final = strategy.finalize(model)
    assert strategy.metrics(final) == {"active_blocks": 9, "total_blocks": 12}
    assert not any(isinstance(m, GatedLoRALinear) for m in final.modules())
    assert torch.allclose(final(x), expected, atol=1e-5, rtol=0)


def test_finalize_in_budget_mode_keeps_exactly_k_even_if_the_search_never_ended():
    model, strategy = selective_vit(active_blocks=5)
    strategy.finalize(model)
    assert strategy.metrics(model) == {"active_blocks": 5, "total_blocks": 8}


def test_state_restores_scores_and_fixed_gates_on_a_fresh_model():
    model, strategy = selective_vit(active_blocks=2)
    set_scores(strategy, {"2.q": 0.8, "0.v": 0.5})
    strategy.on_step(model, 10, 10)
    state = strategy.state()
    assert state["fixed"] is True and state["active"] == ["0.v", "2.q"] and state["total_blocks"] == 8
    other, rebuilt = selective_vit()  # TAPS-mode config: the state alone carries the fixed gates
    rebuilt.load_state(other, state)
    assert rebuilt.state() == state
    assert trainable_parameter_count(other) == trainable_parameter_count(model)


@pytest.mark.parametrize("options, message", [
    (dict(active_blocks=2, active_fraction=0.5), "give active_blocks or active_fraction, not both"),
    (dict(active_blocks=0), "active_blocks must be a positive integer"),
    (dict(active_fraction=1.5), "active_fraction must be in (0, 1]"),
    (dict(active_blocks=2, search_fraction=1.0), "search_fraction must be in (0, 1)"),
    (dict(gate_init=0.05), "gate_init (0.05) must be at least gate_threshold (0.1)"),
    (dict(sparsity_lambda=-1.0), "sparsity_lambda must be >= 0"),
    (dict(penalty_warmup=2.0), "penalty_warmup is a fraction of the steps"),
    (dict(lora_targets="q,z"), "unknown lora target 'z'"),
])
def test_bad_options_raise_a_clear_value_error(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_strategy("selective_lora", cfg(**options))


def test_a_budget_larger_than_the_number_of_lora_blocks_raises_at_apply():
    with pytest.raises(ValueError, match=re.escape("active_blocks 9 exceeds the 8 LoRA blocks")):
        selective_vit(active_blocks=9)
