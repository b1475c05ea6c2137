"""Evaluation as library functions that take a model: target top-1 and source k-NN features.

`sharded=True` says the loader reads this rank's shard (`engine.data.sharding`: each sample on
exactly one rank): the counts are then summed, or the features gathered in rank order, over the
ranks, so every rank gets the answer a single process reading everything would.
"""
from __future__ import annotations

import torch
from torch import nn

from .distributed import gather_rows, sum_over_ranks
from .models import features
from .precision import autocast
from .progress import progress_bar


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device, autocast_dtype=None,
                     desc: str = "features", progress: bool = True,
                     sharded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (fp32, CPU) and labels for every sample the loader yields (all ranks' when sharded)."""
    model.eval()
    feats, labels = [], []
    for images, target in progress_bar(loader, desc=desc, show=progress):
        with autocast(device, autocast_dtype):
            f = features(model, images.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(target.cpu())
    feats, labels = torch.cat(feats), torch.cat(labels)
    if sharded:
        feats, labels = gather_rows(feats), gather_rows(labels)
    return feats, labels


@torch.no_grad()
def top1_accuracy(model: nn.Module, loader, device: torch.device, autocast_dtype=None,
                  desc: str = "eval", progress: bool = True, sharded: bool = False,
                  class_mask: torch.Tensor | None = None) -> float:
    """Top-1 accuracy in percent of the model's logits over one pass of the loader (of every rank's, when sharded).
    `class_mask` (num_classes,) bool restricts the argmax to those classes (a shift set of a subset of them)."""
    model.eval()
    correct = total = 0
    for images, target in progress_bar(loader, desc=desc, show=progress):
        with autocast(device, autocast_dtype):
            logits = model(images.to(device, non_blocking=True))
        if class_mask is not None:
            logits = logits.float().masked_fill(~class_mask.to(logits.device), float("-inf"))
        correct += int((logits.argmax(dim=1).cpu() == target.cpu()).sum())
        total += len(target)
    if sharded:
        correct, total = sum_over_ranks([correct, total])
    if total == 0:
        raise ValueError("evaluation loader yielded no samples")
    return 100.0 * correct / total
