"""The torch path: a DataLoader over a Split with timm's transforms, sharded like the DALI path.

Training augmentation is seeded per sample: sample i of pass e draws its crop and flip from a seed
made of (seed, e, i), whichever rank or worker reads it and whatever was read before. That makes a
pass restartable at any batch (`start_at`, what resume needs: no batch is replayed, no worker's
random stream has to be reproduced) and makes N ranks with micro-batch b read exactly the batches
one rank with micro-batch N x b reads (`engine.data.sharding`), augmentation included.

An image that cannot be read is dropped from its batch and recorded in the loader's `BadImages`
(which stops the run past its limit); a batch of nothing but unreadable images is left out.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import random
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .bad_images import MAX_IMAGE_PIXELS, BadImages, pil_unlimited
from .imagefolder import open_rgb
from .sharding import shard_indices, shard_size
from .splits import Split
from .transforms import Preprocess


class Unreadable(NamedTuple):
    """What SplitDataset returns for a file it cannot read, in place of the sample."""
    path: str
    reason: str


class SplitDataset(Dataset):
    """A Split as a map-style torch Dataset returning (CHW float tensor, label), or `Unreadable`.

    With a `seed` (training) the keys are (epoch, index) pairs and each sample's transform draws
    from its own seed; without one (evaluation, whose transform draws nothing) keys are indices.
    An image of more than twice `max_pixels` is `Unreadable` (`engine.data.bad_images`).
    """

    def __init__(self, split: Split, transform, seed: int | None = None,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
        self.split, self.transform, self.seed, self.max_pixels = split, transform, seed, max_pixels

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        if self.seed is None:
            return self._sample(key)
        epoch, i = key
        with _seeded(f"{self.seed}/{epoch}/{i}"):
            return self._sample(i)

    def _sample(self, i: int):
        if self.split.images is not None:
            img = Image.fromarray(self.split.images[i])
        else:
            try:
                img = open_rgb(self.split.paths[i], self.max_pixels)
            except Exception as e:  # damaged or deleted since the scan-time check
                text = str(e).strip().splitlines()
                return Unreadable(self.split.paths[i], f"{type(e).__name__}: {text[0]}" if text else type(e).__name__)
        with pil_unlimited():  # the run's limit judged the image; PIL's own would check its crops again
            return self.transform(img), int(self.split.labels[i])


def collate_readable(samples: list) -> tuple:
    """(the batch of the readable samples or None, the `Unreadable` ones)."""
    readable = [s for s in samples if not isinstance(s, Unreadable)]
    return (default_collate(readable) if readable else None), [s for s in samples if isinstance(s, Unreadable)]


class ShardSampler(Sampler):
    """`shard_indices` as a torch Sampler; each `iter()` moves on to the next epoch's shuffle.

    Training yields (epoch, index) keys (`SplitDataset` seeds each sample from them), evaluation
    plain indices. `skip` samples at the start of the next pass are left out (resume).
    """

    def __init__(self, n: int, *, rank: int, world: int, train: bool, seed: int) -> None:
        self.n, self.rank, self.world, self.train, self.seed = n, rank, world, train, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return shard_size(self.n, rank=self.rank, world=self.world, train=self.train)

    def __iter__(self):
        index = shard_indices(self.n, rank=self.rank, world=self.world, train=self.train, seed=self.seed,
                              epoch=self.epoch)[self.skip:].tolist()
        epoch, self.epoch, self.skip = self.epoch, self.epoch + 1, 0
        return iter([(epoch, i) for i in index] if self.train else index)


class TorchLoader:
    """A torch DataLoader over a Split whose batches arrive on `device` in `dtype`."""

    def __init__(self, split: Split, preprocess: Preprocess, *, train: bool, batch_size: int, seed: int,
                 workers: int, rank: int, world: int, device: torch.device, dtype: torch.dtype,
                 bad_images: BadImages) -> None:
        self.sampler = ShardSampler(len(split), rank=rank, world=world, train=train, seed=seed)
        self.device, self.dtype, self.batch_size, self.bad_images = device, dtype, batch_size, bad_images
        self.loader = DataLoader(
            SplitDataset(split, preprocess.torch_transform(train), seed if train else None, bad_images.max_pixels),
            batch_size=batch_size, sampler=self.sampler, collate_fn=collate_readable,
            # a split smaller than one batch still trains, on one partial batch
            drop_last=train and len(self.sampler) >= batch_size,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
            multiprocessing_context=_worker_context() if workers > 0 else None,
            # its own generator: drawing worker seeds must not move the global RNG the model uses
            generator=torch.Generator().manual_seed(seed + 7919 * rank))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def start_at(self, epoch: int, batch: int) -> None:
        """Make the next pass epoch `epoch` from its batch `batch` on, as if the earlier ones had been read."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batch * self.batch_size

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


def _worker_context():
    """Workers start from a forkserver that imported this module once, not as forks of this process.

    A fork copies the locks other threads hold at that moment (DALI's pipeline threads, gloo's,
    a progress bar's monitor) and a worker that needs one waits forever: the suite hung exactly so
    on CI, the workers in a futex and the parent waiting on their pipe. The server pays the imports
    once per process; each worker is then a cheap fork of a process with no other threads.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


@contextlib.contextmanager
def _seeded(key: str):
    """Python's, NumPy's and torch's global generators (what timm's and torchvision's transforms draw
    from) seeded from `key` inside the block, and put back as they were after it: in the main
    process (workers=0) the model's random stream must not see the data's draws."""
    rng = random.Random(key)
    python, numpy, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.setstate(rng.getstate())
    np.random.seed(rng.getrandbits(32))
    torch.default_generator.manual_seed(rng.getrandbits(63))  # the CPU generator only, not CUDA's
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.random.set_rng_state(torch_state)

