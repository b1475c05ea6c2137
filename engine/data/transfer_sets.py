"""The paper's other transfer data sets, read from their official archives as extracted under
`--data-root`, in the layouts torchvision's dataset classes read (and `download=True` writes):

- `dtd` (Describable Textures, 47 classes): `dtd/dtd/images/<class>/<name>.jpg` and
  `dtd/dtd/labels/{train,val,test}<N>.txt`, one `<class>/<name>.jpg` a line; ten official
  partitions, `data.dtd_partition` picks one (1 by default, as torchvision's `partition=1`).
- `flowers102` (Oxford 102 Flowers): `flowers-102/jpg/image_00001.jpg` ... with `imagelabels.mat`
  (`labels`, 1..102, one per image) and `setid.mat` (`trnid`, `valid`, `tstid`: 1-based image
  numbers) beside `jpg/`.
- `food101` (Food-101): `food-101/images/<class>/<id>.jpg` with `food-101/meta/classes.txt` and
  `meta/{train,test}.json` (`{class: ["<class>/<id>", ...]}`) or, where the json files are absent,
  `meta/{train,test}.txt` (`<class>/<id>` a line).

The official splits are kept: DTD and Flowers102 have a val split, the run's checkpoint-selection
split; Food101 has none, so the run holds `data.val_fraction` of train out, as for CIFAR. Class
names come from the data set's own files: DTD's folder names in its lists, Food101's `classes.txt`
(label i is its line i), Flowers102's label numbers, named with torchvision's list of the Oxford
names (`torchvision.datasets.Flowers102.classes`, taken from the data set's web page) where the
installed torchvision has it, else `1` ... `102`.

Nothing is downloaded. Every metadata file, then every image the lists name, must exist: the
first one missing is refused in one line that names it and the layout expected, before any image
is read. Listed images that do not decode are skipped as in an image folder (`screen_listed`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from .bad_images import BadImages, shown
from .imagefolder import screen_listed
from .splits import Domain, Split

DTD_PARTITIONS = 10  # labels/train1.txt ... train10.txt

_LAYOUTS = {
    "dtd": "DATA_ROOT/dtd/dtd/images/<class>/<name>.jpg with DATA_ROOT/dtd/dtd/labels/{train,val,test}<N>.txt "
           "(dtd-r1.0.1.tar.gz extracted into DATA_ROOT/dtd)",
    "flowers102": "DATA_ROOT/flowers-102/jpg/image_NNNNN.jpg with DATA_ROOT/flowers-102/imagelabels.mat and "
                  "setid.mat (102flowers.tgz extracted into DATA_ROOT/flowers-102)",
    "food101": "DATA_ROOT/food-101/images/<class>/<id>.jpg with DATA_ROOT/food-101/meta/classes.txt and "
               "meta/{train,test}.json or .txt (food-101.tar.gz extracted into DATA_ROOT)",
}
_TORCHVISION = {"dtd": "DTD", "flowers102": "Flowers102", "food101": "Food101"}


def _missing(name: str, path: Path, data_root: Path) -> UserError:
    return UserError(f"{name}: missing {shown(path)}; expected {_LAYOUTS[name].replace('DATA_ROOT', str(data_root))} "
                     f"(torchvision.datasets.{_TORCHVISION[name]}(root={str(data_root)!r}, download=True) writes it; "
                     f"set --data-root)")


def _require(name: str, paths, data_root: Path) -> None:
    """Refuse the first of `paths` that is not a file (the layout is partial)."""
    for path in paths:
        if not path.is_file():
            raise _missing(name, path, data_root)


def _text_lines(name: str, path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{name}: cannot read {shown(path)}: {e}") from None


def _class_and_item(name: str, path: Path, entry: str) -> tuple[str, str]:
    """`<class>/<item>` from a list file, split; UserError naming the file for any other line."""
    parts = entry.split("/")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"{name}: {shown(path)} lists {entry!r}; each entry must be <class>/<image>")
    return parts[0], parts[1]


def _screened(name: str, folder: Path, lists: dict[str, tuple[list[Path], list[int]]], classes: list[str],
              data_root: Path, bad_images: BadImages | None) -> tuple[dict[str, Split], list[str]]:
    """Each split's (files, labels) as a screened Split, with the notes; every listed file of every
    split must exist, checked before any image is opened."""
    for files, _ in lists.values():
        _require(name, files, data_root)
    splits, notes = {}, []
    for split, (files, labels) in lists.items():
        splits[split], split_notes = screen_listed(folder, files, labels, classes, bad_images)
        notes += split_notes
    return splits, notes


# -- DTD ------------------------------------------------------------------------------------------------

def dtd_domain(data_root: Path, partition: int = 1, bad_images: BadImages | None = None) -> Domain:
    """DTD's partition `partition` (1..10): its train, val and test lists."""
    if not 1 <= partition <= DTD_PARTITIONS:
        raise UserError(f"data.dtd_partition must be in 1..{DTD_PARTITIONS} (DTD's official partitions), "
                        f"got {partition}")
    base = data_root / "dtd" / "dtd"
    lists = {split: base / "labels" / f"{split}{partition}.txt" for split in ("train", "val", "test")}
    _require("dtd", lists.values(), data_root)
    entries = {split: [_class_and_item("dtd", path, e) for e in _text_lines("dtd", path)]
               for split, path in lists.items()}
    classes = sorted({c for listed in entries.values() for c, _ in listed})  # torchvision's order
    index = {c: i for i, c in enumerate(classes)}
    images = base / "images"
    lists = {split: ([images / c / item for c, item in listed], [index[c] for c, _ in listed])
             for split, listed in entries.items()}
    splits, notes = _screened("dtd", images, lists, classes, data_root, bad_images)
    name = "dtd" if partition == 1 else f"dtd (partition {partition})"
    return Domain(name, classes, splits["train"], splits["test"], val=splits["val"], notes=notes)


# -- Flowers102 -----------------------------------------------------------------------------------------

def _flowers_names(count: int) -> list[str]:
    """The Oxford names of labels 1..count, from torchvision where it has them, else the numbers."""
    try:
        from torchvision.datasets import Flowers102
        names = list(getattr(Flowers102, "classes", []))
    except ImportError:
        names = []
    return names[:count] if len(names) >= count else [str(i) for i in range(1, count + 1)]


def _loadmat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... for foreign files
        raise UserError(f"flowers102: cannot read {shown(path)} as a MATLAB file: {e}") from None
    absent = [k for k in keys if k not in mat]
    if absent:
        raise UserError(f"flowers102: {shown(path)} has no {absent[0]!r} array (expected {', '.join(keys)})")
    out = {}
    for k in keys:
        values = np.atleast_1d(np.asarray(mat[k]))
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.number) or values.size == 0 \
                or np.any(values != np.round(values)) or values.min() < 1:
            raise UserError(f"flowers102: {shown(path)}'s {k!r} must be a list of whole numbers from 1")
        out[k] = values.astype(np.int64)
    return out


def flowers102_domain(data_root: Path, bad_images: BadImages | None = None) -> Domain:
    """Oxford 102 Flowers' official train (trnid), val (valid) and test (tstid) splits."""
    base = data_root / "flowers-102"
    labels_mat, setid_mat = base / "imagelabels.mat", base / "setid.mat"
    _require("flowers102", (labels_mat, setid_mat), data_root)
    labels = _loadmat(labels_mat, ("labels",))["labels"] - 1            # (images,) label of image i + 1
    sets = _loadmat(setid_mat, ("trnid", "valid", "tstid"))
    count = int(labels.max()) + 1
    classes = _flowers_names(count)
    for key in ("trnid", "valid", "tstid"):
        if sets[key].max() > len(labels):
            raise UserError(f"flowers102: {shown(setid_mat)}'s {key!r} names image {sets[key].max()}, but "
                            f"{shown(labels_mat)} labels only {len(labels)} images")
    images = base / "jpg"
    lists = {split: ([images / f"image_{i:05d}.jpg" for i in sets[key]], labels[sets[key] - 1].tolist())
             for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}
    splits, notes = _screened("flowers102", images, lists, classes, data_root, bad_images)
    return Domain("flowers102", classes, splits["train"], splits["test"], val=splits["val"], notes=notes)


# -- Food101 --------------------------------------------------------------------------------------------

def _food_list(meta: Path, split: str, classes: list[str], data_root: Path) -> list[tuple[str, str]]:
    """The (class, id) entries of meta/<split>.json, else of meta/<split>.txt."""
    json_path, txt_path = meta / f"{split}.json", meta / f"{split}.txt"
    if json_path.is_file():
        try:
            listed = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"food101: cannot read {shown(json_path)} as JSON: {e}") from None
        if not isinstance(listed, dict) or not all(isinstance(v, list) for v in listed.values()):
            raise UserError(f"food101: {shown(json_path)} must map each class to a list of <class>/<id> entries")
        entries = [_class_and_item("food101", json_path, str(e)) for items in listed.values() for e in items]
        path = json_path
    elif txt_path.is_file():
        path, entries = txt_path, [_class_and_item("food101", txt_path, e) for e in _text_lines("food101", txt_path)]
    else:
        raise _missing("food101", json_path, data_root)
    unknown = sorted({c for c, _ in entries} - set(classes))
    if unknown:
        raise UserError(f"food101: {shown(path)} lists class {unknown[0]!r}, which {shown(meta / 'classes.txt')} lacks")
    return entries


def food101_domain(data_root: Path, bad_images: BadImages | None = None) -> Domain:
    """Food-101's official train and test lists (no val split: the run holds part of train out)."""
    base = data_root / "food-101"
    meta, images = base / "meta", base / "images"
    _require("food101", (meta / "classes.txt",), data_root)
    classes = _text_lines("food101", meta / "classes.txt")
    if len(set(classes)) != len(classes) or not classes:
        raise UserError(f"food101: {shown(meta / 'classes.txt')} must list each class once, one a line")
    index = {c: i for i, c in enumerate(classes)}
    listed = {split: _food_list(meta, split, classes, data_root) for split in ("train", "test")}
    lists = {split: ([images / c / f"{item}.jpg" for c, item in entries], [index[c] for c, _ in entries])
             for split, entries in listed.items()}
    splits, notes = _screened("food101", images, lists, classes, data_root, bad_images)
    return Domain("food101", classes, splits["train"], splits["test"], notes=notes)
