"""The torch path: a DataLoader over a Split with timm's transforms, sharded like the DALI path."""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import UserError
from .imagefolder import open_rgb
from .sharding import shard_indices, shard_size
from .splits import Split
from .transforms import Preprocess


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
            try:
                img = open_rgb(self.split.paths[i])
            except Exception as e:  # damaged or deleted since the scan-time check
                raise UserError(f"cannot read {self.split.paths[i]} ({type(e).__name__}: {e}); "
                                f"replace or remove the file") from None
        return self.transform(img), int(self.split.labels[i])


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
                 workers: int, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> None:
        self.sampler = ShardSampler(len(split), rank=rank, world=world, train=train, seed=seed)
        self.device, self.dtype = device, dtype
        self.loader = DataLoader(
            SplitDataset(split, preprocess.torch_transform(train)), batch_size=batch_size, sampler=self.sampler,
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
        try:
            for images, labels in self.loader:
                yield (images.to(self.device, self.dtype, non_blocking=True),   # (B, 3, S, S)
                       labels.to(self.device, non_blocking=True))               # (B,) int64
        except UserError as e:  # from a worker, it carries the worker's traceback: keep the message
            raise UserError(str(e).rsplit("UserError: ", 1)[-1].strip()) from None


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # DataLoader gives each worker base_seed + worker_id
    np.random.seed(seed)
    random.seed(seed)

