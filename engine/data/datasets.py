"""The data sets a run can name (`--target`, `--source`), each read into a `Domain`: the registry.

`DATASETS` is the one list of named data sets with their class counts (the CLI's help, the config
check and `--dry-run` read it); `imagefolder:DIR` names any folder.

- `shapes`: the embedded source domain the project generates (see `engine.data.shapes`).
- `digits`: scikit-learn's handwritten digits (1,797 8x8 images, shipped with scikit-learn),
  upscaled to 32x32 RGB: the embedded target domain.
- `digits-rot90`, `digits-inverted`: digits rotated by 90 degrees and with inverted contrast
  (`engine.data.variants`), the embedded sequence's later domains (`python -m engine.sequence`).
- `cifar10`, `cifar100`: the python-pickle layout torchvision writes, under `--data-root`.
- `dtd`, `flowers102`, `food101`: the official archives as extracted under `--data-root`, with their
  official splits (`engine.data.transfer_sets`; DTD's partition is `data.dtd_partition`).
- `imagefolder:DIR`: DIR/train/<class>/*.jpg and DIR/test|val/<class>/*.jpg (ImageNet's layout);
  a DIR of class folders alone is split 80/20 into train/test.
- `embedded`: the default for the role, `digits` as a target and `shapes` as a source.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from .bad_images import BadImages, shown
from . import transfer_sets
from .imagefolder import scan_split  # file scanning and bad-file handling live there
from .splits import Domain, Split, stratified_split

SPLIT_SEED = 0  # test splits that the datasets do not define are carved with a fixed seed, not the run's
EMBEDDED = {"target": "digits", "source": "shapes"}  # what `embedded` means in each role
IMAGEFOLDER = "imagefolder:"


@dataclass(frozen=True)
class Dataset:
    """A named data set: how to read it (from the data root) and how many classes it has. `options`
    names what else `read` takes, by keyword: `bad_images` (a reader of image files records the
    unreadable ones there), `partition` (DTD's official partition)."""

    read: Callable[..., Domain]
    num_classes: int
    options: tuple[str, ...] = ()


def _shapes(root: Path) -> Domain:
    from .shapes import shapes_domain
    return shapes_domain()


def _variant(name: str) -> Domain:
    from .variants import variant_domain  # digits under a transform (engine.data.variants)
    return variant_domain(name, digits_domain())


DATASETS: dict[str, Dataset] = {
    "shapes": Dataset(_shapes, 10),
    "digits": Dataset(lambda root: digits_domain(), 10),
    "digits-rot90": Dataset(lambda root: _variant("digits-rot90"), 10),
    "digits-inverted": Dataset(lambda root: _variant("digits-inverted"), 10),
    "cifar10": Dataset(lambda root: cifar_domain("cifar10", root), 10),
    "cifar100": Dataset(lambda root: cifar_domain("cifar100", root), 100),
    "dtd": Dataset(transfer_sets.dtd_domain, 47, ("partition", "bad_images")),
    "flowers102": Dataset(transfer_sets.flowers102_domain, 102, ("bad_images",)),
    "food101": Dataset(transfer_sets.food101_domain, 101, ("bad_images",)),
}
SPEC_HELP = f"embedded | {' | '.join(DATASETS)} | {IMAGEFOLDER}DIR"


def _resolve(spec: str, role: str) -> str:
    """`embedded` -> the role's data set; UserError for a name that is neither registered nor a folder."""
    if spec == "embedded":
        spec = EMBEDDED[role]
    if spec not in DATASETS and not spec.startswith(IMAGEFOLDER):
        raise UserError(f"unknown data set {spec!r}; use {SPEC_HELP.replace(' | ', ', ')}")
    return spec


def check_spec(spec: str, role: str = "target") -> None:
    """Refuse an unknown data set name without reading anything."""
    _resolve(spec, role)


def num_classes(spec: str, role: str = "target") -> int | None:
    """The class count of a named data set, without reading it; None for an image folder."""
    spec = _resolve(spec, role)
    return DATASETS[spec].num_classes if spec in DATASETS else None


def load_domain(spec: str, data_root: str | Path = "data", seed: int = 0, role: str = "target",
                bad_images: BadImages | None = None, dtd_partition: int = 1) -> Domain:
    """Read a `--target` / `--source` spec; `role` says which data set `embedded` means; the unreadable
    images of an image folder or an image-file data set are recorded in `bad_images`; `dtd_partition`
    is DTD's official partition (1..10). (`seed` is unused: a data set's splits never depend on the
    run's seed.) A target of fewer than two classes is refused: its head would learn nothing and
    score 100%."""
    spec = _resolve(spec, role)
    if spec in DATASETS:
        dataset = DATASETS[spec]
        options = {"bad_images": bad_images, "partition": dtd_partition}
        return dataset.read(Path(data_root), **{k: options[k] for k in dataset.options})
    return imagefolder_domain(Path(spec[len(IMAGEFOLDER):]).expanduser(), bad_images,
                              min_classes=2 if role == "target" else 1)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 8, 8) float64 images in 0..16 and (1797,) int64 labels:
    `sklearn.datasets.load_digits()`'s arrays, read from the CSV file scikit-learn ships. Importing
    scikit-learn costs about 2 s, a large share of a short run's start; a layout where that file is
    not found falls back to `load_digits`."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.images, bunch.target


def digits_domain(size: int = 32) -> Domain:
    """scikit-learn's digits, grey 0..16 upscaled bilinearly to `size` x `size` RGB uint8."""
    import torch
    import torch.nn.functional as F

    digits, labels = digits_arrays()
    grey = torch.from_numpy(digits.astype(np.float32) / 16.0)[:, None]               # (N, 1, 8, 8)
    big = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    rgb = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)      # (N, 3, S, S)
    images = rgb.permute(0, 2, 3, 1).contiguous().numpy()                              # (N, S, S, 3)
    full = Split(labels=labels, images=images)
    train, test = stratified_split(full, 0.2, SPLIT_SEED)
    return Domain("digits", [str(i) for i in range(10)], train, test, crop_scale_min=0.35, hflip=0.0)


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", "batches.meta", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"),
}


def cifar_domain(name: str, data_root: Path) -> Domain:
    folder, train_files, test_files, label_key, meta_file, names_key = _CIFAR[name]
    root = data_root / folder
    if not root.is_dir():
        raise UserError(f"{name} not found: expected the python-pickle folder {root} "
                        f"(torchvision.datasets.{name.upper()}(root={str(data_root)!r}, download=True) writes it; "
                        f"set --data-root)")

    def read(file: str) -> dict:
        path = root / file
        if not path.is_file():
            raise UserError(f"{name}: missing file {path}")
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="bytes")
        except Exception as e:  # truncated or foreign pickles
            raise UserError(f"{name}: cannot read {path}: {e}") from None

    def split(files: list[str]) -> Split:
        parts = [read(f) for f in files]
        data = np.concatenate([np.asarray(p[b"data"], dtype=np.uint8) for p in parts])
        labels = np.concatenate([np.asarray(p[label_key]) for p in parts])
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return Split(labels=labels, images=np.ascontiguousarray(images))

    classes = [n.decode() for n in read(meta_file)[names_key]]
    return Domain(name, classes, split(train_files), split(test_files))


def imagefolder_domain(root: Path, bad_images: BadImages | None = None, min_classes: int = 1) -> Domain:
    """DIR/train (+ test or val) or DIR of class folders; fewer than `min_classes` classes is refused
    before any image is read."""
    if not root.is_dir():
        raise UserError(f"image folder {shown(root)} does not exist")
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if train_dir.is_dir():
        classes, train, notes = scan_split(train_dir, bad_images=bad_images, min_classes=min_classes)
        if test_dir is None:
            train, test = stratified_split(train, 0.2, SPLIT_SEED)
        else:
            test_classes, test, test_notes = scan_split(test_dir, classes, bad_images)
            notes += test_notes
    else:
        classes, full, notes = scan_split(root, bad_images=bad_images, min_classes=min_classes)
        train, test = stratified_split(full, 0.2, SPLIT_SEED)
    return Domain(f"imagefolder:{root}", classes, train, test, notes=notes)
