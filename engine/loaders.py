"""Batches of (images, labels) from a Split, by DALI or a torch DataLoader, chosen by one switch.

Both paths use the same preprocessing (`Preprocess`) and read the same samples with the same labels;
the train loop and the k-NN take any iterable of `(images (B, 3, H, W) float, labels (B,) int64)`
and never know which made it. Every loader here is re-iterable: each `iter()` is one pass (a new
shuffle when training), and `len()` is its number of batches.

`--loader auto` means DALI where it is installed and works (checked once, by running a tiny CPU
pipeline), torch otherwise. That holds for the embedded default's 32 x 32 arrays too: measured on
2 CPU cores (`python -m bench.loaders`), DALI's external source turns them into batches several
times faster than the DataLoader (PIL per image), and it works in background threads, so the train
loop's data wait stays well under 1% either way; importing DALI costs about a second, once.

Sharding (`rank`, `world`) is the same on both paths (`shard_indices`): evaluation gives rank r the
r-th contiguous slice, so every sample is scored exactly once across ranks (no padding, the last
batch is partial); training shuffles the whole split with a seed every rank shares, gives each
rank N // world samples of that permutation and drops the last partial batch.
"""
from __future__ import annotations

import functools
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import Split
from .errors import UserError
from .imagefolder import open_rgb
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
            try:
                img = open_rgb(self.split.paths[i])
            except Exception as e:  # damaged or deleted since the scan-time check
                raise UserError(f"cannot read {self.split.paths[i]} ({type(e).__name__}: {e}); "
                                f"replace or remove the file") from None
        return self.transform(img), int(self.split.labels[i])


@functools.lru_cache(maxsize=None)
def _dali_works() -> bool:
    from .dali_loader import dali_works
    return dali_works()


def resolve_loader(name: str) -> str:
    """'auto' -> 'dali' where DALI is installed and usable, 'torch' otherwise."""
    if name not in LOADERS:
        raise ValueError(f"unknown loader {name!r}; choose one of: {', '.join(LOADERS)}")
    if name != "auto":
        return name
    return "dali" if _dali_works() else "torch"


def shard_indices(n: int, *, rank: int, world: int, train: bool, seed: int, epoch: int = 0) -> np.ndarray:
    """The sample indices that rank `rank` of `world` reads in pass `epoch`, in reading order."""
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(n)  # same on every rank
        per = n // world
        return order[rank * per:(rank + 1) * per]
    return np.arange(n * rank // world, n * (rank + 1) // world)


def shard_size(n: int, *, rank: int, world: int, train: bool) -> int:
    """len(shard_indices(...)) without drawing the permutation."""
    return n // world if train else n * (rank + 1) // world - n * rank // world


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


def make_loader(split: Split, preprocess: Preprocess, *, train: bool, batch_size: int, seed: int = 0,
                loader: str = "auto", workers: int = 0, rank: int = 0, world: int = 1,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                dali_resize: str = "auto"):
    """An iterable over one pass of `split` per `iter()` (train: shuffled, last partial batch dropped).

    `workers` is DataLoader worker processes on the torch path and threads on DALI's (at least 1).
    `dali_resize` picks the DALI file pipeline's resampler (`engine.dali_loader`).
    """
    if len(split) == 0:
        raise ValueError("cannot make a loader for an empty split")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    device = torch.device(device or "cpu")
    backend = resolve_loader(loader)
    if backend == "dali":
        if not _dali_works():
            raise UserError("--loader dali: NVIDIA DALI is not installed or cannot run here "
                            "(pip install nvidia-dali-cuda130); use --loader torch or auto")
        from .dali_loader import make_dali_loader
        return make_dali_loader(split, preprocess, train=train, batch_size=batch_size, seed=seed,
                                workers=workers, rank=rank, world=world, device=device, dtype=dtype,
                                resize=dali_resize)
    return TorchLoader(split, preprocess, train=train, batch_size=batch_size, seed=seed, workers=workers,
                       rank=rank, world=world, device=device, dtype=dtype)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # DataLoader gives each worker base_seed + worker_id
    np.random.seed(seed)
    random.seed(seed)

