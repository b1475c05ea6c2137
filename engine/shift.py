"""Accuracy under distribution shift: the fine-tuned classifier on shifted test sets of the target's classes.

`eval.shift` lists specs; each becomes a `ShiftSet` (a split labelled in the target's class indices,
and the classes it may be scored over), and `shift_top1` scores the model on each:

- `corrupt:NAME@SEVERITY`: the target's own test split with one ImageNet-C style corruption
  (Hendrycks and Dietterich 2019) at severity 1-5; `corrupt:all@S` is every corruption at S (each
  a spec of its own in the results). Corruptions are pure functions of the uint8 pixels, applied
  once, before any loader, so DALI and torch read the same corrupted arrays; gaussian_noise draws
  its noise from a generator seeded by the image's index in the split (and the corruption and
  severity), so an image gets the same noise whatever else is corrupted with it.
  The constants are the published ones: CIFAR-10-C's (`make_cifar_c.py`) for images of at most 64 px
  a side (CIFAR, digits), ImageNet-C's (`make_imagenet_c.py`) for larger ones. A test split of image
  files is decoded first, resized (short side to the eval transform's resize) and centre-cropped
  square, as ImageNet-C corrupts centre crops; the eval transform then crops the same centre.
- `imagefolder:DIR`: DIR/<class>/<image> whose class folders are a subset of the target's classes
  (ImageNet-R / -A style); the logits are masked to that subset before the argmax, as their
  evaluation does. A class the target does not have is refused in one line before anything is read.

`auto` (the default) is the target's own choice: the embedded target (digits) gets `corrupt:all@3`
(it costs little: README, "Distribution shift"); any other target gets nothing unless asked.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.bad_images import BadImages, shown
from .data.imagefolder import open_rgb, scan_split
from .data.splits import Domain, Split
from .errors import UserError

CORRUPT = "corrupt:"
FOLDER = "imagefolder:"
AUTO = "auto"
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "jpeg", "pixelate")
SEVERITIES = (1, 2, 3, 4, 5)
TARGET_DEFAULTS = {"digits": ("corrupt:all@3",)}  # what `auto` means per target domain (by Domain.name)
SMALL_SIDE = 64  # images up to this side get CIFAR-10-C's constants, larger ones ImageNet-C's
SEED = 0
MAX_BYTES = 4 << 30  # a test split of files materialised for corruption may take this much memory
SPEC_HELP = (f"corrupt:NAME@SEVERITY (NAME one of {', '.join(CORRUPTIONS)} or all; SEVERITY 1-5), "
             f"imagefolder:DIR (class folders a subset of the target's), auto, or none")

# Severity 1..5 constants, per corruption: (CIFAR-10-C, ImageNet-C).
_CONSTANTS = {
    "gaussian_noise": ((0.04, 0.06, 0.08, 0.09, 0.10), (0.08, 0.12, 0.18, 0.26, 0.38)),  # noise sd in [0, 1]
    "gaussian_blur": ((0.4, 0.6, 0.7, 0.8, 1.0), (1, 2, 3, 4, 6)),                       # sigma in pixels
    "contrast": ((0.75, 0.5, 0.4, 0.3, 0.15), (0.4, 0.3, 0.2, 0.1, 0.05)),               # factor about the mean
    "jpeg": ((80, 65, 58, 50, 40), (25, 18, 15, 10, 7)),                                 # JPEG quality
    "pixelate": ((0.95, 0.9, 0.85, 0.75, 0.65), (0.6, 0.5, 0.4, 0.3, 0.25)),             # down-scale factor
}


# -- specs ---------------------------------------------------------------------------------------------

def _parse_corrupt(spec: str) -> list[tuple[str, int]]:
    body = spec[len(CORRUPT):]
    name, at, severity = body.partition("@")
    if not at or not severity.strip().isdigit() or int(severity) not in SEVERITIES:
        raise UserError(f"eval.shift {spec!r}: expected corrupt:NAME@SEVERITY with SEVERITY 1-5, "
                        f"e.g. corrupt:gaussian_noise@3")
    if name != "all" and name not in CORRUPTIONS:
        raise UserError(f"eval.shift {spec!r}: unknown corruption {name!r}; choose one of "
                        f"{', '.join(CORRUPTIONS)}, or all")
    return [(n, int(severity)) for n in (CORRUPTIONS if name == "all" else (name,))]


def expand_specs(specs: list[str] | None, target: str | None = None) -> list[str]:
    """The specs to measure, in order, each once: `auto` becomes the target domain's default,
    `corrupt:all@S` one spec per corruption. UserError for a malformed spec (nothing is read)."""
    out: list[str] = []
    for spec in specs or []:
        spec = spec.strip()
        if spec == AUTO:
            out += expand_specs(list(TARGET_DEFAULTS.get(target, ()))) if target is not None else []
            continue
        if spec.startswith(CORRUPT):
            out += [f"{CORRUPT}{name}@{severity}" for name, severity in _parse_corrupt(spec)]
        elif spec.startswith(FOLDER) and spec[len(FOLDER):]:
            out.append(spec)
        else:
            raise UserError(f"eval.shift: unknown shift spec {spec!r}; use {SPEC_HELP}")
    return list(dict.fromkeys(out))


def check_specs(specs: list[str] | None) -> None:
    """The config check: every spec well formed (an image folder's classes are checked against the
    target's by `resolve`, once the target is read)."""
    expand_specs(specs, None)


# -- corruptions: pure functions of uint8 (N, H, W, 3) arrays ------------------------------------------

def corrupt_images(images: np.ndarray, name: str, severity: int, first_index: int = 0) -> np.ndarray:
    """`images` (N, H, W, 3) uint8 with corruption `name` at `severity` (1-5), as uint8. Image i is
    treated as index `first_index + i` of its split (the noise's seed), so a split corrupted in
    pieces gives the pixels it gives whole."""
    if name not in CORRUPTIONS or severity not in SEVERITIES:
        raise ValueError(f"unknown corruption {name!r} at severity {severity!r}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    small = max(images.shape[1:3]) <= SMALL_SIDE
    c = _CONSTANTS[name][0 if small else 1][severity - 1]
    x = images.astype(np.float64) / 255.0
    if name == "gaussian_noise":
        code = CORRUPTIONS.index(name)
        noise = np.stack([np.random.default_rng([SEED, code, severity, first_index + i]).normal(size=img.shape, scale=c)
                          for i, img in enumerate(x)]) if len(x) else x
        x = x + noise
    elif name == "gaussian_blur":
        from scipy.ndimage import gaussian_filter  # skimage.filters.gaussian's defaults: nearest, truncate 4
        x = gaussian_filter(x, sigma=(0, c, c, 0), mode="nearest", truncate=4.0)
    elif name == "contrast":
        means = x.mean(axis=(1, 2), keepdims=True)
        x = (x - means) * c + means
    else:
        return np.stack([_pil_corruption(img, name, c) for img in images]) if len(images) else images.copy()
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def _pil_corruption(image: np.ndarray, name: str, c) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(image)
    if name == "jpeg":
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=int(c))
        buffer.seek(0)
        with Image.open(buffer) as out:
            return np.asarray(out.convert("RGB"))
    w, h = img.size  # pixelate: box down to c of the size, box back up
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.BOX))


# -- shift sets ---------------------------------------------------------------------------------------

@dataclass
class ShiftSet:
    """One shifted test set: its spec, its split (labels in the target's class indices; built on
    first use for a corruption) and the class indices its logits are restricted to (None: all)."""
    spec: str
    classes: list[int] | None = None
    _split: Split | None = None
    _source: Split | None = field(default=None, repr=False)  # the clean split a corruption starts from
    _side: int | None = None                                 # square side a split of files is cropped to
    _interpolation: str = "bicubic"

    @property
    def split(self) -> Split:
        if self._split is None:
            name, severity = _parse_corrupt(self.spec)[0]
            images = self._source.images if self._source.in_memory else \
                _centre_crops(self._source.paths, self._side, self._interpolation)
            self._split = Split(labels=self._source.labels, images=corrupt_images(images, name, severity))
        return self._split

    def class_mask(self, num_classes: int) -> torch.Tensor | None:
        """(num_classes,) bool: the logits this set is scored over, or None for all."""
        if self.classes is None:
            return None
        mask = torch.zeros(num_classes, dtype=torch.bool)
        mask[self.classes] = True
        return mask


def resolve(specs: list[str] | None, target: Domain, resize_side: int = 0, interpolation: str = "bicubic",
            bad_images: BadImages | None = None) -> list[ShiftSet]:
    """The shift sets of `specs` for `target` (auto resolved, all expanded). Image folders are
    scanned and their classes checked here; corruptions are computed when first read. UserError
    for a folder class the target lacks, or a test split of files too large to hold corrupted."""
    sets = []
    for spec in expand_specs(specs, target.name):
        if spec.startswith(FOLDER):
            sets.append(_folder_set(spec, target, bad_images))
            continue
        test = target.test
        if not test.in_memory:
            need = len(test) * resize_side * resize_side * 3
            if need > MAX_BYTES:
                raise UserError(f"eval.shift {spec}: the target's test split ({len(test)} image files) would take "
                                f"{need / 2**30:.1f} GiB corrupted at {resize_side} px (at most {MAX_BYTES / 2**30:.0f}); "
                                f"corrupt it beforehand and give the folder as imagefolder:DIR")
        sets.append(ShiftSet(spec, _source=test, _side=resize_side, _interpolation=interpolation))
    return sets


def _folder_set(spec: str, target: Domain, bad_images: BadImages | None) -> ShiftSet:
    root = Path(spec[len(FOLDER):]).expanduser()
    if not root.is_dir():
        raise UserError(f"eval.shift {spec}: folder {shown(root)} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {name: i for i, name in enumerate(target.classes)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise UserError(f"eval.shift {spec}: class folder {shown(unknown[0])} is not a class of the target "
                        f"{target.name} ({len(unknown)} unknown of {len(found)}; the target's classes are "
                        f"{', '.join(target.classes[:5])}{', ...' if len(target.classes) > 5 else ''})")
    classes, split, _ = scan_split(root, bad_images=bad_images)
    labels = np.asarray([index[classes[y]] for y in split.labels], dtype=np.int64)
    return ShiftSet(spec, classes=sorted(index[c] for c in classes),
                    _split=Split(labels=labels, paths=split.paths))


def _centre_crops(paths: list[str], side: int, interpolation: str) -> np.ndarray:
    """Each image file decoded, its short side resized to `side`, centre-cropped to side x side."""
    from PIL import Image

    resample = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(interpolation, Image.BICUBIC)
    out = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        img = open_rgb(path, None)
        w, h = img.size
        scale = side / min(w, h)
        img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), resample)
        left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
        out[i] = np.asarray(img.crop((left, top, left + side, top + side)))
    return out


# -- measuring ----------------------------------------------------------------------------------------

def shift_top1(model, sets: list[ShiftSet], make_loader, device, num_classes: int, autocast_dtype=None,
               progress: bool = True, sharded: bool = True) -> dict[str, float]:
    """Top-1 (%) of `model` on each shift set, keyed by spec; `make_loader(split)` gives its
    (sharded) eval loader, as for the target's test split. The in-memory sets scored over every class
    (the corruptions) go through one loader together: a loader's start costs more than their images."""
    from .evaluate import top1_accuracy
    joint = [s for s in sets if s.classes is None and s.split.in_memory]
    out = _joint_top1(model, joint, make_loader, device, num_classes, autocast_dtype, progress, sharded) \
        if joint else {}
    for s in sets:
        if s not in joint:
            out[s.spec] = top1_accuracy(model, make_loader(s.split), device, autocast_dtype, desc=s.spec,
                                        progress=progress, sharded=sharded, class_mask=s.class_mask(num_classes))
    return {s.spec: out[s.spec] for s in sets}


@torch.no_grad()
def _joint_top1(model, sets: list[ShiftSet], make_loader, device, num_classes, autocast_dtype, progress, sharded):
    """One pass over the sets' images concatenated, each label carrying its set (set * C + label)."""
    from .distributed import sum_over_ranks
    from .precision import autocast
    from .progress import progress_bar

    split = Split(labels=np.concatenate([i * num_classes + s.split.labels for i, s in enumerate(sets)]),
                  images=np.concatenate([s.split.images for s in sets]))
    correct, total = torch.zeros(len(sets), dtype=torch.long), torch.zeros(len(sets), dtype=torch.long)
    model.eval()
    for images, target in progress_bar(make_loader(split), desc="shift sets", show=progress):
        with autocast(device, autocast_dtype):
            logits = model(images.to(device, non_blocking=True))
        target = target.cpu().long()
        which, label = target // num_classes, target % num_classes
        hit = logits.argmax(dim=1).cpu() == label
        correct += torch.bincount(which[hit], minlength=len(sets))
        total += torch.bincount(which, minlength=len(sets))
    counts = [int(v) for v in torch.cat([correct, total])]
    if sharded:
        counts = sum_over_ranks(counts)
    return {s.spec: 100.0 * counts[i] / counts[len(sets) + i] for i, s in enumerate(sets)}


def summary(per_set: dict[str, float]) -> dict:
    """results.json's `shift_top1` and `target_shift_top1` (their mean); nothing when no set was measured."""
    if not per_set:
        return {}
    return {"shift_top1": {k: round(v, 4) for k, v in per_set.items()},
            "target_shift_top1": round(sum(per_set.values()) / len(per_set), 4)}

