"""Scanning an ImageFolder split: class folders in sorted order (torchvision's), image files only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import Split
from .errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def scan_split(folder: Path, classes: list[str] | None = None) -> tuple[list[str], Split, list[str]]:
    """Return (classes, split, notes). `classes` pins the label order to another split's."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"image folder {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"image folder {folder} has classes the train split lacks: {', '.join(unknown[:5])}")
    paths, labels, notes, skipped = [], [], [], 0
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped += len(files) - len(images)
        if not images:
            raise UserError(f"class folder {class_dir} holds no images")
        paths += [str(p) for p in images]
        labels += [label] * len(images)
    if skipped:
        notes.append(f"{folder}: skipped {skipped} non-image files")
    return classes, Split(labels=np.asarray(labels), paths=paths), notes
