"""Backbone building: local weights load when they fit and fail with one clear line when not."""
import pytest
import torch
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.errors import UserError
from engine.models import build_backbone, features, load_weights

TINY = "vit_tiny_patch16_224"


def tiny(**kw):
    import timm
    return timm.create_model(TINY, pretrained=False, num_classes=0, **kw)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_into_the_named_model(tmp_path, suffix):
    source = tiny()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"model": state}, path)
    model = build_backbone(ModelConfig(name=TINY, weights=str(path)))
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(features(model.eval(), x), features(source.eval(), x), rtol=0, atol=0)


def test_a_classifier_in_the_file_is_dropped(tmp_path):
    source = tiny()
    state = dict(source.state_dict(), **{"head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "w.pth")
    load_weights(tiny(), tmp_path / "w.pth")


def test_weights_of_another_model_name_the_mismatch(tmp_path):
    torch.save(tiny(depth=2).state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"does not fit .*missing keys, e\.g\. blocks\.2\."):
        load_weights(tiny(), tmp_path / "w.pth")


def test_wrong_shapes_are_named(tmp_path):
    torch.save(tiny(embed_dim=96, num_heads=2).state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match="wrong shape"):
        load_weights(tiny(), tmp_path / "w.pth")


def test_missing_and_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_weights(tiny(), tmp_path / "nope.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read"):
        load_weights(tiny(), tmp_path / "bad.safetensors")


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown model"):
        build_backbone(ModelConfig(name="vit_nonexistent_patch99"))


def test_hub_weights_offline_fail_with_a_hint(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so patch it
    with pytest.raises(UserError, match="--weights PATH"):
        build_backbone(ModelConfig(name="vit_small_patch16_224.dino"))
