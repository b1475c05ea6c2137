"""LoRA on timm ViTs: what trains, where the updates land in the fused qkv, merging, and bad options."""
import copy
import re

import pytest
import torch
from torch import nn

import adapters.lora as lora_mod
from adapters import LoRALinear, get_strategy, merge_lora, trainable_parameter_count, unmerge_lora
from adapter_helpers import cfg, images, sgd_steps, tiny_vit, vit_b_meta, randomize_b


def lora_vit(seed=0, **options):
    model = tiny_vit(seed=seed)
    strategy = get_strategy("lora", cfg(**options))
    return strategy.apply(model, 10).eval(), strategy




# The paper's table shows 301 K / 448 K / 743 K: an old peft release counted the 76,900-parameter
# classifier twice. These are the honest counts: 36,864 x r + the head.
@pytest.mark.parametrize("rank, expected", [(4, 224_356), (8, 371_812), (16, 666_724)])
def test_trainable_parameters_on_vit_base_with_100_classes(rank, expected):
    model = get_strategy("lora", cfg(lora_rank=rank)).apply(vit_b_meta(), 100)
    assert trainable_parameter_count(model) == expected == 36_864 * rank + 76_900


def test_default_targets_are_the_q_and_v_thirds_of_the_fused_qkv():
    model, _ = lora_vit()
    for block in model.blocks:
        qkv = block.attn.qkv
        assert isinstance(qkv, LoRALinear)
        assert qkv.segment_names == ["q", "v"]
        assert qkv.starts == {"q": 0, "v": 128}  # D = 64: q [0, 64), k [64, 128) untouched, v [128, 192)
        assert all(type(m) is nn.Linear for m in (block.attn.proj, block.mlp.fc1, block.mlp.fc2))


def test_wrapped_qkv_keeps_timm_state_dict_names():
    model, _ = lora_vit()
    keys = set(model.state_dict())
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"} <= keys
    assert {"blocks.0.attn.qkv.lora_a.q", "blocks.0.attn.qkv.lora_b.q", "blocks.0.attn.qkv.lora_a.v"} <= keys


def test_a_is_kaiming_uniform_and_b_is_zero():
    model, _ = lora_vit(lora_rank=8)
    qkv = model.blocks[0].attn.qkv
    bound = 1 / 64 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 64, as nn.Linear's init
    for a in qkv.lora_a.values():
        assert a.abs().max() <= bound and a.std() > bound / 4
    assert all(torch.count_nonzero(b) == 0 for b in qkv.lora_b.values())


def test_alpha_defaults_to_rank_so_the_scale_is_one():
    assert lora_vit(lora_rank=4)[0].blocks[0].attn.qkv.scale == 1.0
    assert lora_vit(lora_rank=4, lora_alpha=8)[0].blocks[0].attn.qkv.scale == 2.0


def test_model_equals_the_base_model_exactly_at_init():
    model, _ = lora_vit()
    base = tiny_vit()  # same seed: the same frozen weights
    base.head.load_state_dict(model.head.state_dict())
    x = images()
    assert torch.equal(model(x), base(x))


def test_merged_logits_equal_unmerged():
    model, _ = lora_vit()
    randomize_b(model)
    x = images()
    unmerged = model(x)
    merged = merge_lora(model)(x)
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)
    assert not torch.equal(merged, lora_vit()[0](x))  # the update is really there
    assert torch.allclose(unmerge_lora(model)(x), unmerged, atol=1e-5, rtol=0)


def test_unmerge_restores_the_frozen_weights():
    model, _ = lora_vit()
    randomize_b(model)
    before = model.blocks[1].attn.qkv.weight.clone()
    merge_lora(model)
    assert not torch.equal(model.blocks[1].attn.qkv.weight, before)
    unmerge_lora(model)
    assert torch.allclose(model.blocks[1].attn.qkv.weight, before, atol=1e-6, rtol=0)


def test_sgd_changes_only_lora_and_head_parameters():
    model, _ = lora_vit()
    before = copy.deepcopy(model.state_dict())
    sgd_steps(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "training changed nothing"
    assert all(".lora_" in k or k.startswith("head.") for k in changed), sorted(changed)
    assert any(".lora_b." in k for k in changed) and "head.weight" in changed


def test_k_slice_of_qkv_never_receives_an_update():
    model, _ = lora_vit()
    original = copy.deepcopy(model)
    sgd_steps(model)
    merge_lora(model)
    for block, orig in zip(model.blocks, original.blocks):
        w, w0 = block.attn.qkv.weight, orig.attn.qkv.weight
        assert torch.equal(w[64:128], w0[64:128])
        assert not torch.equal(w[:64], w0[:64]) and not torch.equal(w[128:], w0[128:])


@pytest.mark.parametrize("target, module, columns, params_per_block", [
    ("q", "attn.qkv", (0, 64), 4 * (64 + 64)),
    ("k", "attn.qkv", (64, 128), 4 * (64 + 64)),
    ("v", "attn.qkv", (128, 192), 4 * (64 + 64)),
    ("proj", "attn.proj", (0, 64), 4 * (64 + 64)),
    ("fc1", "mlp.fc1", (0, 256), 4 * (64 + 256)),
    ("fc2", "mlp.fc2", (0, 64), 4 * (256 + 64)),
])
def test_each_target_writes_only_its_output_columns(target, module, columns, params_per_block):
    model, _ = lora_vit(lora_rank=4, lora_targets=target)
    randomize_b(model)
    wrapped = model.blocks[0].get_submodule(module)
    assert isinstance(wrapped, LoRALinear) and wrapped.segment_names == [target]
    x = torch.randn(5, wrapped.in_features)
    changed = (wrapped(x) - nn.functional.linear(x, wrapped.weight, wrapped.bias)).abs().amax(0) > 0
    expected = torch.zeros(wrapped.out_features, dtype=torch.bool)
    expected[columns[0]:columns[1]] = True
    assert torch.equal(changed, expected)
    assert trainable_parameter_count(model) == 4 * params_per_block + 64 * 10 + 10


def test_dropout_reaches_only_the_low_rank_path():
    model, _ = lora_vit(lora_dropout=0.5)
    x = images()
    at_init = model(x)
    model.train()
    assert torch.allclose(model(x), at_init, atol=1e-5, rtol=0)  # B = 0: dropout on the base would show
    randomize_b(model)
    model.eval()
    dropout_free = copy.deepcopy(model)
    for m in dropout_free.modules():
        if isinstance(m, LoRALinear):
            m.dropout = 0.0
    assert torch.equal(model(x), dropout_free(x))  # eval: no dropout at all
    model.train()
    assert not torch.allclose(model(x), dropout_free.train()(x), atol=1e-4)


def test_finalize_gives_a_plain_timm_model_with_the_same_logits():
    model, strategy = lora_vit()
    randomize_b(model)
    x = images()
    expected = model(x)
    final = strategy.finalize(model)
    assert not any(isinstance(m, LoRALinear) for m in final.modules())
    assert set(final.state_dict()) == set(tiny_vit().state_dict())
    assert torch.allclose(final(x), expected, atol=1e-5, rtol=0)


def test_lora_math_goes_through_the_fused_kernel_op(monkeypatch):
    calls = []
    real = lora_mod.lora_linear

    def spy(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_mod, "lora_linear", spy)
    model, _ = lora_vit()
    model(images())
    assert calls == [2] * 4  # one call per block's qkv, two segments (q, v) each


@pytest.mark.parametrize("options, message", [
    (dict(lora_targets="q,x"), "unknown lora target 'x'"),
    (dict(lora_targets=" , "), "lora_targets is empty"),
    (dict(lora_rank=0), "lora_rank must be a positive integer"),
    (dict(lora_alpha=-1.0), "lora_alpha must be positive"),
    (dict(lora_dropout=1.0), "lora_dropout must be in [0, 1)"),
])
def test_bad_options_raise_a_clear_value_error(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_strategy("lora", cfg(**options))
