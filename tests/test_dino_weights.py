"""DINO's released files load as they are: the backbone-only `dino_vitbase16_pretrain.pth` layout and the
full training checkpoint (teacher and student, `module.` / `backbone.` prefixes, a projection head)."""
import argparse

import pytest
import timm
import torch

from engine.errors import UserError
from engine.models import features, load_weights

ARCH = "vit_tiny_patch16_224"


def vit(seed):
    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=0, depth=2).eval()


def dino_head(prefix):
    """DINO's projection head (DINOHead: an MLP and a weight-normalised last layer), small."""
    return {f"{prefix}head.mlp.0.weight": torch.randn(32, 192), f"{prefix}head.mlp.0.bias": torch.randn(32),
            f"{prefix}head.mlp.2.weight": torch.randn(16, 32), f"{prefix}head.last_layer.weight_g": torch.ones(64, 1),
            f"{prefix}head.last_layer.weight_v": torch.randn(64, 16)}


@pytest.fixture(scope="module")
def networks():
    return {"teacher": vit(1), "student": vit(2)}


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory, networks):
    """The layout of DINO's `*_full_checkpoint.pth`: the student was wrapped in DistributedDataParallel."""
    path = tmp_path_factory.mktemp("dino") / "dino_full_checkpoint.pth"
    teacher = {f"backbone.{k}": v for k, v in networks["teacher"].state_dict().items()}
    student = {f"module.backbone.{k}": v for k, v in networks["student"].state_dict().items()}
    torch.save({"teacher": {**teacher, **dino_head("")}, "student": {**student, **dino_head("module.")},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "epoch": 100,
                "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64),
                "dino_loss": {"center": torch.zeros(1, 64)}}, path)
    return path


def same_features(a, b):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(features(a.eval(), x), features(b.eval(), x))


def test_the_backbone_only_release_loads_as_it_is(tmp_path, networks):
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(networks["teacher"].state_dict(), path)  # timm's key names, no head
    model = vit(0)
    assert load_weights(model, path) is None  # nothing chosen, nothing dropped: nothing to say
    assert same_features(model, networks["teacher"])


def test_the_full_checkpoint_gives_the_teacher_by_default_and_says_what_it_dropped(full_checkpoint, networks):
    model = vit(0)
    note = load_weights(model, full_checkpoint)
    assert same_features(model, networks["teacher"]) and not same_features(model, networks["student"])
    assert "the teacher network of a training checkpoint" in note
    assert "dropped 5 head keys (head.last_layer.weight_g, head.last_layer.weight_v, head.mlp.0.bias, ...)" in note


def test_the_student_can_be_chosen(full_checkpoint, networks):
    model = vit(0)
    assert "the student network" in load_weights(model, full_checkpoint, entry="student")
    assert same_features(model, networks["student"])


def test_a_missing_network_is_named(tmp_path, networks):
    path = tmp_path / "teacher_only.pth"
    torch.save({"teacher": networks["teacher"].state_dict()}, path)
    with pytest.raises(UserError, match="holds no 'student' network \\(it holds teacher\\)"):
        load_weights(vit(0), path, entry="student")


def test_the_entry_is_a_config_choice():
    from engine.config import parse_args

    assert parse_args([]).model.weights_entry == "teacher"
    with pytest.raises(UserError, match="model.weights_entry must be one of teacher, student"):
        parse_args(["--weights-entry", "ema"])
