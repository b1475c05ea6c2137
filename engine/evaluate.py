"""Evaluation as library functions that take a model: target top-1 and source k-NN features."""
from __future__ import annotations

import torch
from torch import nn

from .models import features
from .precision import autocast
from .progress import progress_bar


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device, autocast_dtype=None,
                     desc: str = "features", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (fp32, CPU) and labels for every sample the loader yields."""
    model.eval()
    feats, labels = [], []
    for images, target in progress_bar(loader, desc=desc, show=progress):
        with autocast(device, autocast_dtype):
            f = features(model, images.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(target.cpu())
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def top1_accuracy(model: nn.Module, loader, device: torch.device, autocast_dtype=None,
                  desc: str = "eval", progress: bool = True) -> float:
    """Top-1 accuracy in percent of the model's logits over one pass of the loader."""
    model.eval()
    correct = total = 0
    for images, target in progress_bar(loader, desc=desc, show=progress):
        with autocast(device, autocast_dtype):
            logits = model(images.to(device, non_blocking=True))
        correct += int((logits.argmax(dim=1).cpu() == target.cpu()).sum())
        total += len(target)
    if total == 0:
        raise ValueError("evaluation loader yielded no samples")
    return 100.0 * correct / total
