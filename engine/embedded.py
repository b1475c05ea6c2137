"""The embedded default's backbone: the small ViT the project pre-trained on its shapes domain.

`create_embedded_vit()` builds the timm ViT that `python -m engine.pretrain` trained on
`engine.data.shapes` and loads the checkpoint shipped in `engine/assets/` (backbone only; the
strategy adds the head).
"""
from __future__ import annotations

from pathlib import Path

from .data.shapes import IMAGE_SIZE
from .errors import UserError

# The backbone: 6 blocks of width 128 on 4x4 patches (64 tokens + CLS), about 1.2 M parameters,
# 4.8 MB in fp32. timm's VisionTransformer kwargs, so `timm.create_model(any_vit, **EMBEDDED_VIT)`
# rebuilds it (engine.models.timm_spec relies on that).
EMBEDDED_VIT = dict(img_size=IMAGE_SIZE, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                    class_token=True, global_pool="token")
# Channel mean / std of shapes_domain().train in [0, 1], rounded; pretraining normalised with these.
EMBEDDED_MEAN = (0.5, 0.5, 0.5)
EMBEDDED_STD = (0.3, 0.3, 0.3)

ASSETS = Path(__file__).resolve().parent / "assets"
CHECKPOINT = ASSETS / "embedded_vit.safetensors"
PROVENANCE = ASSETS / "embedded_vit.json"



def create_embedded_vit(pretrained: bool = True, num_classes: int = 0, depth: int | None = None):
    """The embedded ViT, with the shipped backbone weights when `pretrained`.

    `num_classes=0` means no head: `forward_head(x, pre_logits=True)` is the CLS token after the
    final norm. Its `pretrained_cfg` makes timm's `resolve_model_data_config` give the
    preprocessing pretraining used (32 px, crop_pct 1.0, bicubic, EMBEDDED_MEAN / EMBEDDED_STD).
    `depth` other than the shipped one (a merged block expansion's) needs its weights from a file.
    """
    from timm.models.vision_transformer import VisionTransformer

    shape = dict(EMBEDDED_VIT)
    if depth is not None and depth != shape["depth"]:
        if pretrained:
            raise UserError(f"model.depth={depth}: the embedded checkpoint has {shape['depth']} blocks; give the "
                            f"deeper backbone's file with --weights")
        shape["depth"] = depth
    model = VisionTransformer(**shape, num_classes=num_classes)
    model.pretrained_cfg = model.default_cfg = {
        "architecture": "embedded",
        "input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "fixed_input_size": True,
        "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bicubic",
        "mean": EMBEDDED_MEAN, "std": EMBEDDED_STD,
        "num_classes": num_classes, "first_conv": "patch_embed.proj", "classifier": "head",
        "file": str(CHECKPOINT), "source": "python -m engine.pretrain",
    }
    if pretrained:
        _load_backbone(model, CHECKPOINT)
    return model


def _load_backbone(model, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"the embedded ViT checkpoint {path} is missing; rebuild it with "
                        f"`python -m engine.pretrain` (about 15 minutes on 2 CPU cores), "
                        f"or pass --model NAME / --weights PATH")
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:  # truncated or foreign file
        raise UserError(f"cannot read the embedded ViT checkpoint {path} ({e}); "
                        f"rebuild it with `python -m engine.pretrain`") from None
    own = {k for k in model.state_dict() if not k.startswith("head.")}
    missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
    if missing or unexpected:
        raise UserError(f"the embedded ViT checkpoint {path} does not fit EMBEDDED_VIT: "
                        f"{len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}; "
                        f"rebuild it with `python -m engine.pretrain`")
    model.load_state_dict(state, strict=False)  # the head (if any) keeps its fresh init
