"""Preprocessing that follows the model's pretrained config (timm's data config).

Train: random-resized crop (area `train_scale`: 0.08-1, the paper's recipe, unless the target
asks otherwise; digits keep 0.35-1) + horizontal flip (probability `hflip`; none for digits) + normalise.
Eval (target top-1 and k-NN): resize to size / crop_pct + centre crop + normalise.
"""
from __future__ import annotations

from dataclasses import dataclass

from timm.data import create_transform, resolve_model_data_config


@dataclass(frozen=True)
class Preprocess:
    input_size: int                      # square side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    train_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5                   # probability of a horizontal flip in training

    @classmethod
    def from_model(cls, model, *, crop_scale_min: float = 0.08, hflip: float = 0.5) -> "Preprocess":
        cfg = resolve_model_data_config(model)
        return cls(
            input_size=int(cfg["input_size"][-1]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            train_scale=(float(crop_scale_min), 1.0),
            hflip=float(hflip),
        )

    @property
    def resize_size(self) -> int:
        """The short side before the eval centre crop, as timm computes it."""
        import math
        return math.floor(self.input_size / self.crop_pct)

    def torch_transform(self, train: bool):
        """A torchvision transform from PIL image to normalised CHW float tensor."""
        common = dict(input_size=(3, self.input_size, self.input_size), mean=self.mean, std=self.std,
                      interpolation=self.interpolation)
        if train:
            return create_transform(is_training=True, scale=self.train_scale, hflip=self.hflip, vflip=0.0,
                                    color_jitter=None, auto_augment=None, re_prob=0.0, **common)
        return create_transform(is_training=False, crop_pct=self.crop_pct, **common)
