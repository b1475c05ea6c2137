"""Batches of (images, labels) from a Split, by DALI or a torch DataLoader, chosen by one switch.

Both paths use the same preprocessing (`Preprocess`); the train loop and the k-NN take any
iterable of `(images (B, 3, H, W) float, labels (B,) int64)` and never know which made it.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data import Split
from .transforms import Preprocess

LOADERS = ("auto", "dali", "torch")


class SplitDataset(Dataset):
    """A Split as a map-style torch Dataset returning (CHW float tensor, label)."""

    def __init__(self, split: Split, transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if self.split.images is not None:
            img = Image.fromarray(self.split.images[i])
        else:
            with Image.open(self.split.paths[i]) as f:
                img = f.convert("RGB")
        return self.transform(img), int(self.split.labels[i])


def resolve_loader(name: str) -> str:
    """'auto' -> 'dali' where DALI is installed and usable, 'torch' otherwise."""
    if name not in LOADERS:
        raise ValueError(f"unknown loader {name!r}; choose one of: {', '.join(LOADERS)}")
    if name == "auto":
        return "torch"
    return name


def make_loader(split: Split, preprocess: Preprocess, *, train: bool, batch_size: int, seed: int = 0,
                loader: str = "auto", workers: int = 0, rank: int = 0, world: int = 1):
    """An iterable over one pass of `split` (train: shuffled, last partial batch dropped).

    For training, the engine asks for a fresh pass each epoch by calling iter() again.
    """
    backend = resolve_loader(loader)
    if backend == "dali":
        from .dali_loader import make_dali_loader
        return make_dali_loader(split, preprocess, train=train, batch_size=batch_size, seed=seed,
                                workers=workers, rank=rank, world=world)
    dataset = SplitDataset(split, preprocess.torch_transform(train))
    sampler = None
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train and len(dataset) >= batch_size, num_workers=workers,
                      generator=generator, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_seed_worker)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random
    random.seed(seed)
