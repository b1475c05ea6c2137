"""The embedded default: the generated source domain and the shipped pre-trained ViT."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from timm.data import resolve_model_data_config

from engine import embedded
from engine.data import shapes
from engine.data.shapes import CLASSES, shapes_domain
from engine.embedded import CHECKPOINT, EMBEDDED_MEAN, EMBEDDED_STD, EMBEDDED_VIT, PROVENANCE, create_embedded_vit
from engine.errors import UserError


def test_shapes_domain_is_deterministic():
    first = shapes_domain()
    train, test = first.train.images.copy(), first.test.images.copy()
    shapes._render.cache_clear()
    again = shapes_domain()
    assert again.train.images.tobytes() == train.tobytes()
    assert again.test.images.tobytes() == test.tobytes()
    assert np.array_equal(again.train.labels, first.train.labels)


def test_shapes_train_and_test_are_different_images():
    d = shapes_domain()
    assert not np.array_equal(d.train.images[:len(d.test)], d.test.images)


def test_shapes_domain_has_balanced_uint8_images_of_ten_named_classes():
    d = shapes_domain()
    assert d.name == "shapes" and d.classes == list(CLASSES) and d.num_classes == 10
    assert len(set(d.classes)) == 10
    for split, n in ((d.train, 5000), (d.test, 1000)):
        assert split.images.shape == (n, 32, 32, 3) and split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert np.array_equal(np.bincount(split.labels, minlength=10), np.full(10, n // 10))


def test_shapes_domain_sizes_are_prefixes_of_larger_ones():
    small, default = shapes_domain(1500, 10), shapes_domain()
    assert len(small.train) == 1500 and len(small.test) == 10
    assert np.array_equal(small.train.images, default.train.images[:1500])
    assert np.array_equal(small.test.labels, default.test.labels[:10])


def test_shapes_domain_returns_fresh_objects_around_cached_arrays():
    first = shapes_domain()
    first.train = first.train.subset(np.arange(10))  # what a caller carving a val split might do
    assert len(shapes_domain().train) == 5000
    with pytest.raises(ValueError):
        shapes_domain().train.images[0, 0, 0, 0] = 1  # the cache is read-only


def test_shapes_images_are_varied_not_blank():
    images = shapes_domain().train.images[:200].astype(np.float32)
    assert images.std(axis=(1, 2, 3)).min() > 5          # every image has content
    assert len({img.tobytes() for img in shapes_domain().train.images}) == 5000


def test_normalisation_constants_match_the_data():
    x = shapes_domain().train.images.astype(np.float32) / 255
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), EMBEDDED_MEAN, atol=0.02)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), EMBEDDED_STD, atol=0.02)


def test_embedded_vit_data_config_is_what_pretraining_used():
    cfg = resolve_model_data_config(create_embedded_vit(pretrained=False))
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == EMBEDDED_MEAN and tuple(cfg["std"]) == EMBEDDED_STD


def test_headless_embedded_vit_feature_is_cls_after_final_norm():
    model = create_embedded_vit(pretrained=False).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)                        # (B, 65, 128)
        feature = model.forward_head(tokens, pre_logits=True)     # (B, 128)
        expected = model.norm(model.blocks(model._pos_embed(model.patch_embed(x))))[:, 0]
    assert tokens.shape == (3, 65, EMBEDDED_VIT["embed_dim"])
    torch.testing.assert_close(feature, expected)
    torch.testing.assert_close(model(x), feature)                 # num_classes=0: no head


def test_shipped_checkpoint_is_small_and_documented():
    assert CHECKPOINT.is_file() and CHECKPOINT.stat().st_size < 10 * 2**20
    import json
    provenance = json.loads(PROVENANCE.read_text())
    assert {"seed", "steps", "source_knn20", "params", "wall_s", "torch", "timm"} <= (
        provenance.keys() | provenance["config"].keys())


def test_shipped_checkpoint_loads_with_no_missing_keys():
    state = load_file(str(CHECKPOINT))
    model = create_embedded_vit(pretrained=True)
    assert set(state) == set(model.state_dict())                  # headless: no head.*, nothing missing
    assert all(v.dtype == torch.float32 for v in state.values())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


def test_pretrained_model_with_a_head_keeps_the_backbone_weights():
    model = create_embedded_vit(pretrained=True, num_classes=10)
    state = load_file(str(CHECKPOINT))
    assert model.head.out_features == 10
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_timm_create_model_rebuilds_the_architecture():
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **EMBEDDED_VIT, num_classes=0)
    model.load_state_dict(load_file(str(CHECKPOINT)), strict=True)


def test_shipped_checkpoint_features_separate_the_source_classes():
    from engine.knn import knn_accuracy
    from engine.pretrain import _normalise, _to_tensors

    model = create_embedded_vit().eval()
    d = shapes_domain()
    bank, bank_y = _to_tensors(d.train.subset(np.arange(1000)))
    queries, query_y = _to_tensors(d.test.subset(np.arange(500)))
    with torch.no_grad():
        acc = knn_accuracy(model(_normalise(bank)), bank_y, model(_normalise(queries)), query_y, ks=(20,))[20]
    assert acc > 50.0  # chance is 10%


def test_missing_checkpoint_is_a_user_error_that_says_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "CHECKPOINT", tmp_path / "nowhere.safetensors")
    with pytest.raises(UserError, match=r"python -m engine\.pretrain"):
        create_embedded_vit(pretrained=True)
    create_embedded_vit(pretrained=False)  # random init needs no file


def test_foreign_checkpoint_is_a_user_error(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    monkeypatch.setattr(embedded, "CHECKPOINT", path)
    with pytest.raises(UserError, match="does not fit"):
        create_embedded_vit(pretrained=True)
