"""The torch path: a DataLoader over a Split with timm's transforms, sharded like the DALI path.

An image that cannot be read is dropped from its batch and recorded in the loader's `BadImages`
(which stops the run past its limit); a batch of nothing but unreadable images is left out.
"""
from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .bad_images import BadImages
from .imagefolder import open_rgb
from .sharding import shard_indices, shard_size
from .splits import Split
from .transforms import Preprocess


class Unreadable(NamedTuple):
    """What SplitDataset returns for a file it cannot read, in place of the sample."""
    path: str
    reason: str


class SplitDataset(Dataset):
    """A Split as a map-style torch Dataset returning (CHW float tensor, label), or `Unreadable`."""

    def __init__(self, split: Split, transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if self.split.images is not None:
            img = Image.fromarray(self.split.images[i])
        else:
            try:
                img = open_rgb(self.split.paths[i])
            except Exception as e:  # damaged or deleted since the scan-time check
                text = str(e).strip().splitlines()
                return Unreadable(self.split.paths[i], f"{type(e).__name__}: {text[0]}" if text else type(e).__name__)
        return self.transform(img), int(self.split.labels[i])


def collate_readable(samples: list) -> tuple:
    """(the batch of the readable samples or None, the `Unreadable` ones)."""
    readable = [s for s in samples if not isinstance(s, Unreadable)]
    return (default_collate(readable) if readable else None), [s for s in samples if isinstance(s, Unreadable)]


class ShardSampler(Sampler[int]):
    """`shard_indices` as a torch Sampler; each `iter()` moves on to the next epoch's shuffle."""

    def __init__(self, n: int, *, rank: int, world: int, train: bool, seed: int) -> None:
        self.n, self.rank, self.world, self.train, self.seed = n, rank, world, train, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return shard_size(self.n, rank=self.rank, world=self.world, train=self.train)

    def __iter__(self):
        index = shard_indices(self.n, rank=self.rank, world=self.world, train=self.train, seed=self.seed,
                              epoch=self.epoch)
        self.epoch += 1
        return iter(index.tolist())


class TorchLoader:
    """A torch DataLoader over a Split whose batches arrive on `device` in `dtype`."""

    def __init__(self, split: Split, preprocess: Preprocess, *, train: bool, batch_size: int, seed: int,
                 workers: int, rank: int, world: int, device: torch.device, dtype: torch.dtype,
                 bad_images: BadImages) -> None:
        self.sampler = ShardSampler(len(split), rank=rank, world=world, train=train, seed=seed)
        self.device, self.dtype, self.bad_images = device, dtype, bad_images
        self.loader = DataLoader(
            SplitDataset(split, preprocess.torch_transform(train)), batch_size=batch_size, sampler=self.sampler,
            collate_fn=collate_readable,
            # a split smaller than one batch still trains, on one partial batch
            drop_last=train and len(self.sampler) >= batch_size,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
            # its own generator: drawing worker seeds must not move the global RNG the model uses
            generator=torch.Generator().manual_seed(seed + 7919 * rank), worker_init_fn=_seed_worker)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch, unreadable in self.loader:
            for sample in unreadable:
                self.bad_images.add(sample.path, sample.reason)
            if batch is None:
                continue
            images, labels = batch
            yield (images.to(self.device, self.dtype, non_blocking=True),   # (B, 3, S, S)
                   labels.to(self.device, non_blocking=True))               # (B,) int64


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # DataLoader gives each worker base_seed + worker_id
    np.random.seed(seed)
    random.seed(seed)

