"""Linear probing over cached features: the frozen backbone sees each training image once.

When only the head trains and the training images are the same every epoch, every epoch's backbone
forward repeats the first one. `train.cache_features` (default: on for `linear` with augmentation
off) computes the pre-logit features of the whole training split once and trains the head over them.

Augmentation off means `data.crop_scale_min=1` and `data.hflip=0`: timm's random-resized crop at the
whole area can only take its fallback, the whole image centre-cropped to the 3/4..4/3 aspect range,
so the training transform still draws numbers but always yields the same image. The features are
read through the torch path's training transform (`SplitDataset` under the loader's seed), with the
model in train mode under the run's autocast, exactly what a recomputing step feeds the head; on the
DALI path (`auto` here) a recomputing run decodes and resamples with DALI instead, equal within a
grey level.

`FeatureLoader` deals the cached rows out in the same batches as the training loader
(`engine.data.sharding`), with the same `set_epoch` / `start_at`, so the data position of a full
checkpoint means the same thing and --resume works (a resumed run recomputes the cache first).
While training, the model's forward sends a (batch, width) input straight to the head; images
(validation, the forgetting curve) still go through the whole model.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data.sharding import shard_indices, shard_size
from .data.splits import Split
from .data.torch_loader import SplitDataset, Unreadable
from .data.transforms import Preprocess
from .errors import UserError
from .models import features
from .precision import autocast


def augmentation_off(data_cfg) -> bool:
    """True when the training transform yields the same image every epoch (see the module docstring)."""
    return data_cfg.crop_scale_min == 1 and data_cfg.hflip == 0


def wanted(cfg) -> bool:
    """train.cache_features as set, or by default: on for linear probing without augmentation."""
    if cfg.train.cache_features is not None:
        return cfg.train.cache_features
    return cfg.strategy == "linear" and augmentation_off(cfg.data)


def check(cfg) -> None:
    """UserError when train.cache_features=true asks for what the cache cannot do (cfg resolved for
    the target, so its augmentation is known)."""
    if not cfg.train.cache_features:
        return
    if cfg.strategy != "linear":
        raise UserError(f"train.cache_features=true needs --strategy linear (only a head can train over cached "
                        f"features; {cfg.strategy} trains the backbone)")
    if not augmentation_off(cfg.data):
        raise UserError(f"train.cache_features=true needs augmentation off: data.crop_scale_min=1 data.hflip=0 "
                        f"(got {cfg.data.crop_scale_min} and {cfg.data.hflip})")


def trains_head_only(model: nn.Module) -> bool:
    """True when no parameter outside model.head requires grad (the cache would freeze them)."""
    return all(not p.requires_grad or name.startswith("head.") for name, p in model.named_parameters())


@torch.no_grad()
def compute_features(model: nn.Module, split: Split, preprocess: Preprocess, *, seed: int, batch_size: int,
                     workers: int, device: torch.device, amp, bad_images) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) on `device`, readable (N,) bool) of every sample of `split` through the
    training transform, the model in train mode as the train loop runs it."""
    dataset = SplitDataset(split, preprocess.torch_transform(True), seed)
    keys = [(0, i) for i in range(len(split))]  # epoch 0: the transform yields the same image in any epoch
    batches = DataLoader(dataset, batch_size=batch_size, sampler=keys, collate_fn=list, num_workers=workers)
    was_training = model.training
    model.train()
    rows, readable = [None] * len(split), torch.zeros(len(split), dtype=torch.bool)
    try:
        for first, samples in zip(range(0, len(split), batch_size), batches):
            read = [first + j for j, s in enumerate(samples) if not isinstance(s, Unreadable)]
            for sample in samples:
                if isinstance(sample, Unreadable):
                    bad_images.add(sample.path, sample.reason)
            if not read:
                continue
            images = torch.stack([s[0] for s in samples if not isinstance(s, Unreadable)])
            with autocast(device, amp):
                out = features(model, images.to(device)).float()
            for i, row in zip(read, out):
                rows[i] = row
            readable[read] = True
    finally:
        model.train(was_training)
    if not readable.any():
        raise RuntimeError("no training image could be read for the feature cache")
    empty = torch.zeros_like(next(r for r in rows if r is not None))
    return torch.stack([empty if r is None else r for r in rows]), readable


class FeatureLoader:
    """The training loader's batches, of cached features: the same samples in the same order per
    epoch and rank (`shard_indices`), the last partial batch dropped as there, unreadable samples
    left out of their batch."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, readable: torch.Tensor, *, batch_size: int,
                 seed: int, rank: int, world: int) -> None:
        self.feats, self.labels, self.readable = feats, labels.to(feats.device), readable
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch, self.skip = 0, 0
        self._shard = shard_size(len(feats), rank=rank, world=world, train=True)
        self._drop_last = self._shard >= batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, epoch: int, batch: int) -> None:
        """The next pass is epoch `epoch` from its batch `batch` on (the torch loader's `start_at`)."""
        self.epoch, self.skip = epoch, batch * self.batch_size

    def __len__(self) -> int:
        return self._shard // self.batch_size if self._drop_last else 1

    def __iter__(self):
        order = shard_indices(len(self.feats), rank=self.rank, world=self.world, train=True, seed=self.seed,
                              epoch=self.epoch)
        stop = len(self) * self.batch_size if self._drop_last else len(order)
        start, self.epoch, self.skip = self.skip, self.epoch + 1, 0
        for first in range(start, stop, self.batch_size):
            index = torch.as_tensor(order[first:first + self.batch_size])
            index = index[self.readable[index]].to(self.feats.device)
            if len(index):
                yield self.feats[index], self.labels[index]


@contextlib.contextmanager
def head_over_features(model: nn.Module):
    """Inside the block a (batch, width) input to `model` goes to its head alone; images take the
    whole model (an instance attribute over the class's forward, removed on the way out)."""
    whole = model.forward

    def forward(x):
        return model.head(x) if x.dim() == 2 else whole(x)

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward
