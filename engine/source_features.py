"""The untouched backbone's source features, extracted once and shared by every run that would extract
the same ones.

Every run of a sweep measures the untouched backbone's source k-NN (the "before" accuracy) and, at step
0 of its forgetting curve, the same backbone again on the curve's subsets: all runs of one backbone,
source and preprocessing get the same features, and so the same accuracies. Here each such feature set
(one loader's: the k-NN bank, its queries, the curve's bank and queries) is content-addressed: its key
is a hash of the backbone's state_dict tensors (names, dtypes, shapes and bytes) and the model's name
and depth, the split's listing (file paths with their sizes and modification times, or the in-memory
images' bytes, and the labels; the subset limits and their seed act through which images are listed),
the evaluation preprocessing, the loader that decodes, the precision, the device type and the batch.

The cache is a folder of `<key>.safetensors` files in the run's `--out` folder
(`OUT/source_features/`): a sweep's runs all write into the sweep folder, so the first run of a
backbone extracts and the others reuse; a lone run shares with the runs beside it in its --out (the
folder may be deleted at any time; an entry is a feature matrix: 5,000 x 128 floats, 2.6 MB, for the
embedded source's bank, 1.28 M x 768, 3.9 GB, for ImageNet's whole train split under ViT-B). Each
file stores its key and a hash of its own tensors; on load both are checked, and the labels and the
row count against the split: a file that does not match, or does not load, is recomputed and written
again (atomically, `engine.io`), never trusted. A split with an unreadable image is not cached (the run
must meet it to count it, `engine.data.bad_images`). With several ranks the features are sharded and
nothing is cached (the run measures as before); `eval.source_cache=false` turns the cache off (a run
whose --out should hold nothing but run folders).

The step-0 curve point taken from these features is the untouched backbone's, as step 0 is by
definition (a strategy's new parameters start at zero contribution); the run says in one line what it
reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import data
from .curve import curve_steps
from .evaluate import extract_features
from .io import atomic_write_safetensors
from .knn import knn_correct
from .precision import PRECISIONS

FOLDER = "source_features"  # under the run's --out (a sweep's: the sweep folder)
_FORMAT = 1                 # bumped when what a file holds, or how its key is made, changes


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state_dict: each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def split_digest(split: data.Split) -> str:
    """sha256 of a split's listing: its labels and either its in-memory images' bytes or each file's path,
    size and modification time (a file replaced or touched gives another digest)."""
    h = hashlib.sha256()
    h.update(split.labels.tobytes())
    if split.images is not None:
        h.update(f"images|{split.images.dtype}|{split.images.shape}\n".encode())
        h.update(split.images.tobytes() if not split.images.flags.c_contiguous else split.images.data)
    else:
        for path in split.paths:
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _content_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _split_of(loader) -> data.Split:
    """The split an eval loader reads (DALI's keeps it; the torch loader's dataset does)."""
    split = getattr(loader, "split", None)
    return split if split is not None else loader.loader.dataset.split


class FeatureCache:
    """One run's view of the cache: the backbone's digest and the settings every key shares."""

    def __init__(self, folder: Path, weights: str, settings: dict) -> None:
        self.folder, self.weights, self.settings = Path(folder), weights, settings
        self.reused: list[str] = []     # what came from the cache, for the run's line
        self.extracted: list[str] = []
        self.seconds = 0.0

    def key(self, split: data.Split) -> str:
        described = {"format": _FORMAT, "weights": self.weights, "split": split_digest(split), **self.settings}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]

    def load(self, key: str, split: data.Split) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored features of `key`, or None when there is no file or it does not verify."""
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception:  # truncated, overwritten, not safetensors: recompute
            return None
        if set(tensors) != {"features", "labels"} or meta.get("key") != key \
                or meta.get("content") != _content_digest(tensors):
            return None
        feats, labels = tensors["features"], tensors["labels"]
        if len(feats) != len(split) or not np.array_equal(labels.numpy(), split.labels):
            return None
        return feats, labels

    def features(self, model, loader, desc: str, device: torch.device, amp, progress: bool):
        """(features, labels) of `loader`'s split under the untouched `model`: from the cache where a
        file verifies, else extracted (and stored when every image was read)."""
        split = _split_of(loader)
        key = self.key(split)
        began = time.perf_counter()
        found = self.load(key, split)
        if found is not None:
            self.reused.append(f"{desc} ({len(split)})")
            self.seconds += time.perf_counter() - began
            return found
        feats, labels = extract_features(model, loader, device, amp, desc=desc, progress=progress)
        self.extracted.append(f"{desc} ({len(split)})")
        if len(feats) == len(split):
            tensors = {"features": feats.contiguous(), "labels": labels.to(torch.int64).contiguous()}
            atomic_write_safetensors(self.folder / f"{key}.safetensors", tensors,
                                     metadata={"key": key, "content": _content_digest(tensors)})
        return feats, labels


def open_cache(backbone, cfg, source_pre: data.Preprocess, device: torch.device, out: str | Path) -> FeatureCache:
    """The cache in OUT/source_features for this run's untouched `backbone` and settings."""
    settings = {
        "model": cfg.model.name, "depth": cfg.model.depth,
        "preprocess": {"input_size": source_pre.input_size, "mean": list(source_pre.mean),
                       "std": list(source_pre.std), "crop_pct": source_pre.crop_pct,
                       "interpolation": source_pre.interpolation},
        "loader": data.resolve_loader(cfg.data.loader), "dali_resize": cfg.data.dali_resize,
        "max_image_pixels": cfg.data.max_image_pixels, "precision": cfg.train.precision,
        "device": device.type, "batch_size": cfg.eval.batch_size}
    return FeatureCache(Path(out) / FOLDER, weights_digest(backbone), settings)


def measure_untouched(backbone, loaders, cfg, num_source_classes: int, rt, source_pre: data.Preprocess, measure):
    """The untouched backbone's source k-NN per k, as `measure(backbone, loaders, cfg, classes, rt)`
    (engine.run.measure_source) gives it, and the forgetting curve's step-0 features (bank, labels,
    queries, labels; None when the curve has no step 0), both from the shared cache where it holds
    them. With several ranks: `measure`'s own answer and no curve features."""
    if rt.world > 1 or not cfg.eval.source_cache:
        return measure(backbone, loaders, cfg, num_source_classes, rt), None
    amp = PRECISIONS[cfg.train.precision]
    cache = open_cache(backbone, cfg, source_pre, rt.device, cfg.out)
    bank, bank_y = cache.features(backbone, loaders.knn_bank, "k-NN bank", rt.device, amp, rt.main)
    query, query_y = cache.features(backbone, loaders.knn_query, "k-NN queries", rt.device, amp, rt.main)
    ks = cfg.eval.knn_k
    correct = knn_correct(bank, bank_y, query, query_y, ks, cfg.eval.knn_temperature, num_classes=num_source_classes)
    knn = {k: 100.0 * correct[k] / len(query) for k in ks}
    curve = None
    if loaders.curve_bank is not None and 0 in curve_steps(cfg.eval.knn_steps, cfg.train.steps):
        curve = (*cache.features(backbone, loaders.curve_bank, "curve bank", rt.device, amp, False),
                 *cache.features(backbone, loaders.curve_query, "curve queries", rt.device, amp, False))
    rt.say(describe(cache))
    return knn, curve


def describe(cache: FeatureCache) -> str:
    """The run's one line on what it reused and what it extracted."""
    if cache.reused and not cache.extracted:
        return (f"source features: reused the untouched backbone's {', '.join(cache.reused)} from {cache.folder} "
                f"(extracted by an earlier run; verified, {cache.seconds:.1f} s)")
    if cache.reused:
        return (f"source features: reused {', '.join(cache.reused)} from {cache.folder}; extracted "
                f"{', '.join(cache.extracted)}")
    return f"source features: extracted {', '.join(cache.extracted)}; cached in {cache.folder} for later runs"
