"""Domains derived from the embedded target, as continual-learning benchmarks derive theirs from
MNIST (Rotated MNIST, Permuted MNIST): the same images and labels under a fixed transform, so a
sequence of them shifts the inputs and keeps the task.

- `digits-rot90`: scikit-learn's digits (`engine.data.datasets.digits_domain`) rotated by 90 degrees
  counter-clockwise.
- `digits-inverted`: the same digits with inverted contrast (255 - pixel): light strokes on dark
  become dark strokes on light.

Train and test splits are digits' own, image for image. Registered in `engine.data.datasets.DATASETS`,
so they are `--target` / `--source` names anywhere.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .splits import Domain, Split


def _rot90(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))  # (N, H, W, 3): rotate H and W


def _inverted(images: np.ndarray) -> np.ndarray:
    return 255 - images


VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"digits-rot90": _rot90, "digits-inverted": _inverted}


def variant_domain(name: str, base: Domain) -> Domain:
    """`base` (the digits domain) under `name`'s transform (a key of VARIANTS), with its augmentation choice."""
    transform = VARIANTS[name]

    def split(s: Split) -> Split:
        return Split(labels=s.labels, images=transform(s.images))

    return Domain(name, base.classes, split(base.train), split(base.test), crop_scale_min=base.crop_scale_min,
                  hflip=base.hflip)
