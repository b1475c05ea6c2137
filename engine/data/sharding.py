"""Which samples each rank reads, the same on every loader path.

Evaluation gives rank r the r-th contiguous slice, so every sample is scored exactly once across
ranks (no padding, the last batch is partial). Training shuffles the whole split with a seed every
rank shares and deals the permutation out like cards: rank r reads positions r, r + world,
r + 2 world, ... (N // world of them; the last partial batch is dropped). Dealt that way, the j-th
micro-batches of all ranks together hold exactly the samples of the j-th batch of one rank with a
micro-batch world times larger, so N ranks and one rank see the same global batches.
"""
from __future__ import annotations

import numpy as np


def shard_indices(n: int, *, rank: int, world: int, train: bool, seed: int, epoch: int = 0) -> np.ndarray:
    """The sample indices that rank `rank` of `world` reads in pass `epoch`, in reading order."""
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(n)  # same on every rank
        return order[rank::world][:n // world]
    return np.arange(n * rank // world, n * (rank + 1) // world)


def shard_size(n: int, *, rank: int, world: int, train: bool) -> int:
    """len(shard_indices(...)) without drawing the permutation."""
    return n // world if train else n * (rank + 1) // world - n * rank // world
