"""Data sets as splits of images and labels.

A `Domain` is what a run needs from a data set: train and test splits (and a validation split the
engine carves out of train for checkpoint selection). A `Split` holds its images either in memory
(uint8 HWC arrays: CIFAR, digits, the embedded domain) or as file paths (ImageFolder layouts).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Split:
    """One split: `labels` (N,) int64 and either `images` (N, H, W, 3) uint8 or `paths` (N files)."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.images) if self.images is not None else len(self.paths or [])
        if n != len(self.labels):
            raise ValueError(f"split has {n} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, index) -> "Split":
        index = np.asarray(index, dtype=np.int64)
        return Split(
            labels=self.labels[index],
            images=self.images[index] if self.images is not None else None,
            paths=[self.paths[i] for i in index] if self.paths is not None else None,
        )


@dataclass
class Domain:
    """A data set as the engine sees it: class names and its splits."""

    name: str
    classes: list[str]
    train: Split
    test: Split
    val: Split | None = None
    notes: list[str] = field(default_factory=list)  # e.g. "skipped 2 unreadable files"
    # Training augmentation suited to the domain, used where the config leaves it unset: the
    # paper's random-resized crop (8-100% of the area) and a horizontal flip suit natural images,
    # not handwritten digits, where a flip turns one class into a stranger and a small crop erases it.
    crop_scale_min: float = 0.08
    hflip: float = 0.5

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out `fraction` of every class (at least one sample where a class has two or more)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == c)
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        if fraction > 0 and n == 0 and len(idx) > 1:
            n = 1
        held.extend(idx[:n].tolist())
    held_mask = np.zeros(len(split), dtype=bool)
    held_mask[held] = True
    return split.subset(np.flatnonzero(~held_mask)), split.subset(np.flatnonzero(held_mask))



def capped(split: Split, limit: int | None, seed: int) -> Split:
    """At most `limit` samples of `split`, drawn class by class (`stratified_split`); all of it for None
    or a split no larger."""
    if limit is None or len(split) <= limit:
        return split
    return stratified_split(split, limit / len(split), seed)[1]
