"""`python -m engine.pretrain`: rebuild the embedded ViT checkpoint from a seed.

Supervised classification of `shapes_domain()` with a throwaway linear head: batched tensor-level
augmentation (random-resized crop + horizontal flip), AdamW, linear warm-up then cosine, a plain
torch loop. At the end it measures the source weighted 20-NN accuracy (the forgetting metric's
starting point) and writes the backbone without its head, fp32 safetensors, atomically, with a
small JSON of provenance beside it.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.shapes import CLASSES, shapes_domain
from .embedded import CHECKPOINT, EMBEDDED_MEAN, EMBEDDED_STD, EMBEDDED_VIT, create_embedded_vit
from .io import atomic_write, atomic_write_json


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 1800
    batch_size: int = 128
    lr: float = 7e-4                               # 2e-3 and up learned far slower (measured, patch 8)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = (0.7, 1.0)   # mild: objects sit off-centre, a small crop can lose them
    n_train: int = 5000                            # shapes_domain sizes; the k-NN bank is the train split
    n_test: int = 1000
    threads: int = 2
    knn_k: int = 20


def pretrain(cfg: PretrainConfig, out: str | Path = CHECKPOINT, progress: bool = True) -> dict:
    """Train, measure, write `out` and `out.with_suffix('.json')`; return the provenance dict."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg, Path(out), progress)
    finally:
        torch.set_num_threads(threads)  # callers (tests, the engine) keep their own setting


def _pretrain(cfg: PretrainConfig, out: Path, progress: bool) -> dict:
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    domain = shapes_domain(cfg.n_train, cfg.n_test)
    train_x, train_y = _to_tensors(domain.train)
    test_x, test_y = _to_tensors(domain.test)

    model = create_embedded_vit(pretrained=False, num_classes=domain.num_classes)
    decays = {n: p.ndim > 1 and n not in ("pos_embed", "cls_token") for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decays[n]]
    no_decay = [p for n, p in model.named_parameters() if not decays[n]]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, cfg.warmup_steps, cfg.steps))

    model.train()
    order = torch.empty(0, dtype=torch.long)
    losses, curve = [], []  # curve: mean loss per 100 steps, kept in the provenance
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress)
    for step in bar:
        if len(order) < cfg.batch_size:  # a fresh permutation per epoch; the tail joins the next one
            order = torch.cat([order, torch.randperm(len(train_x), generator=generator)])
        index, order = order[:cfg.batch_size], order[cfg.batch_size:]
        images = random_resized_crop_flip(train_x[index], cfg.crop_scale, generator)   # (B, 3, 32, 32)
        loss = F.cross_entropy(model(_normalise(images)), train_y[index], label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) == 100 or step == cfg.steps - 1:
            curve.append(round(sum(losses) / len(losses), 4))
            losses = []
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")

    knn = source_knn(model, train_x, train_y, test_x, test_y, ks=(cfg.knn_k,))[cfg.knn_k]
    backbone = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()
                if not k.startswith("head.")}
    atomic_write(out, lambda tmp: _save(backbone, tmp))
    provenance = {
        "seed": cfg.seed, "steps": cfg.steps,
        "architecture": "timm VisionTransformer", "kwargs": EMBEDDED_VIT,
        "mean": EMBEDDED_MEAN, "std": EMBEDDED_STD,
        "params": sum(v.numel() for v in backbone.values()),
        "bytes": out.stat().st_size,
        f"source_knn{cfg.knn_k}": round(knn, 2),
        "wall_s": round(time.perf_counter() - start, 1),
        "loss_per_100_steps": curve,
        "torch": torch.__version__, "timm": timm.__version__,
        "command": " ".join(["python -m engine.pretrain", *_cli_flags(cfg)]),
        "config": asdict(cfg),
    }
    atomic_write_json(out.with_suffix(".json"), provenance)
    return provenance


def random_resized_crop_flip(images: torch.Tensor, scale: tuple[float, float], generator: torch.Generator,
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """timm's RandomResizedCrop + horizontal flip for a whole batch at once, via one grid_sample.

    Each crop covers a fraction of the area drawn from `scale`, with a log-uniform aspect ratio,
    at a uniform position; the crop is resampled bilinearly to the input size. (B, 3, H, W) float.
    """
    b = len(images)
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)    # crop width / image width
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)  # centres keep the crop inside
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def source_knn(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
               test_y: torch.Tensor, ks=(20,), batch_size: int = 500) -> dict[int, float]:
    """Weighted k-NN accuracy (%) of the backbone's CLS feature: bank = train, queries = test."""
    from .knn import knn_accuracy
    from .models import features

    was_training = model.training
    model.eval()

    def feats(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([features(model, _normalise(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])

    result = knn_accuracy(feats(train_x), train_y, feats(test_x), test_y, ks=ks)
    model.train(was_training)
    return result


def _to_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], and int64 labels."""
    images = torch.from_numpy(np.array(split.images)).permute(0, 3, 1, 2).float() / 255
    return images.contiguous(), torch.from_numpy(np.array(split.labels, dtype=np.int64))


_MEAN = torch.tensor(EMBEDDED_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(EMBEDDED_STD).view(1, 3, 1, 1)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - _MEAN) / _STD


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The engine's schedule (linear warm-up, cosine to zero) at `step`."""
    from .config import TrainConfig
    from .optim import lr_lambda

    return lr_lambda(TrainConfig(steps=total, warmup_steps=warmup, schedule="cosine"))(step)


def _save(state: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file
    save_file(state, path, metadata={"format": "pt", "model": "engine.embedded"})


def _cli_flags(cfg: PretrainConfig) -> list[str]:
    default = PretrainConfig()
    return [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items()
            if v != getattr(default, k) and not isinstance(v, tuple)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.pretrain", description=__doc__.splitlines()[0])
    defaults = PretrainConfig()
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--n-train", type=int, default=defaults.n_train, help="generated training images")
    p.add_argument("--n-test", type=int, default=defaults.n_test, help="generated k-NN query images")
    p.add_argument("--threads", type=int, default=defaults.threads)
    p.add_argument("--out", default=str(CHECKPOINT), help="checkpoint path (.safetensors); JSON goes beside it")
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    cfg = PretrainConfig(**args)
    provenance = pretrain(cfg, out)
    print(f"source {cfg.knn_k}-NN accuracy {provenance[f'source_knn{cfg.knn_k}']:.2f}% "
          f"(chance {100 / len(CLASSES):.0f}%), {provenance['params']:,} parameters, {provenance['wall_s']:.0f} s")
    print(f"wrote {out} ({provenance['bytes'] / 1e6:.1f} MB) and {Path(out).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
