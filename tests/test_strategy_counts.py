"""Exact trainable-parameter counts on timm's vit_base_patch16_224 with a 100-class head."""
import pytest
import timm

import adapters
from engine.config import AdapterConfig


@pytest.fixture(scope="module")
def vit_b_counts():
    counts = {}
    for name, options in [("full", {}), ("top_k", {"top_k": 3}), ("linear", {})]:
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        adapters.get_strategy(name, AdapterConfig(**options)).apply(model, 100)
        counts[name] = adapters.trainable_parameter_count(model)
    return counts


def test_full_trains_everything(vit_b_counts):
    assert vit_b_counts["full"] == 85_875_556


def test_top3_trains_three_blocks_final_norm_and_head(vit_b_counts):
    assert vit_b_counts["top_k"] == 21_342_052


def test_linear_trains_the_head_only(vit_b_counts):
    assert vit_b_counts["linear"] == 76_900


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="choose one of: full"):
        adapters.get_strategy("fulll", AdapterConfig())


def test_top_k_beyond_depth_is_rejected():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=32)
    with pytest.raises(ValueError, match="between 1 and the model's depth 2"):
        adapters.get_strategy("top_k", AdapterConfig(top_k=3)).apply(model, 10)
