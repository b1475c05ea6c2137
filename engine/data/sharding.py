"""Which samples each rank reads, the same on every loader path.

Evaluation gives rank r the r-th contiguous slice, so every sample is scored exactly once across
ranks (no padding, the last batch is partial); training shuffles the whole split with a seed every
rank shares, gives each rank N // world samples of that permutation and drops the last partial batch.
"""
from __future__ import annotations

import numpy as np


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
