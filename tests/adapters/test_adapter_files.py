"""Adapters on disk: only the trainable weights plus JSON, and an exact round trip onto a fresh base model."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from adapters import get_strategy, trainable_parameter_count
from engine.adapter_files import load_adapter, save_adapter
from engine.errors import UserError
from adapter_helpers import cfg, images, sgd_steps, tiny_vit

BASE = {"model": "tiny", "weights": None, "num_classes": 10, "timm": {"name": "vit_tiny_patch16_224", "kwargs": {}}}


def fine_tuned(name, steps=4, **options):
    """A tiny ViT (seed 0) with `name` applied and trained a few steps, as the engine would."""
    strategy = get_strategy(name, cfg(**options))
    model = strategy.apply(tiny_vit(seed=0), 10)
    return sgd_steps(model, steps=steps, strategy=strategy), strategy


@pytest.mark.parametrize("name, options", [
    ("lora", dict(lora_rank=4, lora_targets="q,v,fc1")),
    ("block_expansion", dict(blocks=3)),
    ("selective_lora", dict(gate_init=0.12, sparsity_lambda=5.0, penalty_warmup=0.0)),  # TAPS: gates live
    ("selective_lora", dict(active_blocks=3, search_fraction=0.5)),                      # budget: gates fixed
    ("full", {}), ("linear", {}), ("top_k", dict(top_k=2)),
], ids=["lora", "block_expansion", "selective_taps", "selective_budget", "full", "linear", "top_k"])
def test_loading_onto_a_fresh_base_model_reproduces_the_logits_exactly(tmp_path, name, options):
    model, strategy = fine_tuned(name, **options)
    x = images()
    expected = model(x)
    save_adapter(model, strategy, tmp_path, BASE)
    loaded, loaded_strategy = load_adapter(tiny_vit(seed=0), tmp_path)
    assert not loaded.training
    assert loaded_strategy.state() == strategy.state()
    assert torch.equal(loaded(x), expected)


def test_selective_budget_checkpoint_keeps_its_fixed_gates(tmp_path):
    model, strategy = fine_tuned("selective_lora", active_blocks=3, search_fraction=0.5)
    save_adapter(model, strategy, tmp_path, BASE)
    _, loaded = load_adapter(tiny_vit(seed=0), tmp_path)
    assert loaded.metrics(None) == {"active_blocks": 3, "total_blocks": 8}
    assert loaded.state()["active"] == strategy.state()["active"]


def test_the_weights_file_holds_only_the_trainable_parameters(tmp_path):
    model, strategy = fine_tuned("lora", steps=1)
    save_adapter(model, strategy, tmp_path, BASE)
    tensors = load_file(tmp_path / "adapter.safetensors")
    assert set(tensors) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in k or k.startswith("head.") for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == trainable_parameter_count(model)


def test_the_json_names_strategy_config_state_and_base(tmp_path):
    model, strategy = fine_tuned("block_expansion", steps=1, blocks=2)
    save_adapter(model, strategy, tmp_path, BASE)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["strategy"] == "block_expansion"
    assert meta["adapter_config"]["blocks"] == 2 and "lora_targets" in meta["adapter_config"]
    assert meta["state"] == {"positions": [1, 3], "depth": 4}
    assert meta["base"] == BASE


def test_saving_twice_replaces_the_files_and_leaves_no_temporary_files(tmp_path):
    model, strategy = fine_tuned("lora", steps=1)
    save_adapter(model, strategy, tmp_path, BASE)
    save_adapter(model, strategy, tmp_path, BASE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]


def test_weights_that_do_not_fit_name_the_missing_keys(tmp_path):
    model, strategy = fine_tuned("lora", steps=1)
    save_adapter(model, strategy, tmp_path, BASE)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["adapter_config"]["lora_targets"] = "q,k,v"
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=re.escape("8 missing keys, e.g. blocks.0.attn.qkv.lora_a.k")):
        load_adapter(tiny_vit(seed=0), tmp_path)


def test_weights_of_the_wrong_shape_name_the_key(tmp_path):
    model, strategy = fine_tuned("lora", steps=1, lora_rank=4)
    save_adapter(model, strategy, tmp_path, BASE)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["adapter_config"]["lora_rank"] = 8
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    message = "blocks.0.attn.qkv.lora_a.q has shape (4, 64), the model expects (8, 64)"
    with pytest.raises(UserError, match=re.escape(message)):
        load_adapter(tiny_vit(seed=0), tmp_path)


def test_a_missing_folder_or_file_is_a_clear_user_error(tmp_path):
    with pytest.raises(UserError, match="adapter folder .* does not exist"):
        load_adapter(tiny_vit(), tmp_path / "nope")
    with pytest.raises(UserError, match="holds no adapter: expected adapter.json and adapter.safetensors"):
        load_adapter(tiny_vit(), tmp_path)


def test_an_unknown_adapter_option_is_a_clear_user_error(tmp_path):
    model, strategy = fine_tuned("linear", steps=1)
    save_adapter(model, strategy, tmp_path, BASE)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    meta["adapter_config"]["lora_magic"] = 1
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="adapter options this version does not know: lora_magic"):
        load_adapter(tiny_vit(), tmp_path)
