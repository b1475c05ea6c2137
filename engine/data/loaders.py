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

Sharding (`rank`, `world`) is the same on both paths (`engine.data.sharding`).
"""
from __future__ import annotations

import functools

import torch

from ..errors import UserError
from .bad_images import BadImages
from .splits import Split
from .transforms import Preprocess

LOADERS = ("auto", "dali", "torch")


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


def make_loader(split: Split, preprocess: Preprocess, *, train: bool, batch_size: int, seed: int = 0,
                loader: str = "auto", workers: int = 0, rank: int = 0, world: int = 1,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                dali_resize: str = "auto", bad_images: BadImages | None = None):
    """An iterable over one pass of `split` per `iter()` (train: shuffled, last partial batch dropped).

    `workers` is DataLoader worker processes on the torch path and threads on DALI's (at least 1).
    `dali_resize` picks the DALI file pipeline's resampler (`engine.data.dali_loader`). Files that
    cannot be read are skipped and recorded in `bad_images` (`engine.data.bad_images`; by default
    a limit of none, so the first one is a UserError naming it).
    """
    bad_images = BadImages() if bad_images is None else bad_images
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
                                resize=dali_resize, bad_images=bad_images)
    from .torch_loader import TorchLoader
    return TorchLoader(split, preprocess, train=train, batch_size=batch_size, seed=seed, workers=workers,
                       rank=rank, world=world, device=device, dtype=dtype, bad_images=bad_images)
