"""Scanning an ImageFolder split, and opening its images as the torch loader and DALI both see them.

Class folders are read in sorted order (torchvision's `ImageFolder` order), so label `i` is the
i-th class name on both loader paths. What happens to awkward files, case by case:

- non-image files (`notes.txt`, `.DS_Store`, any suffix outside `IMAGE_SUFFIXES`): skipped, counted
  in `Domain.notes` (the run log prints it).
- undecodable images (a text file named `.jpg`, an empty file, a truncated JPEG or PNG): found at
  scan time and skipped, counted and named in the notes, so both loaders read the same, known
  sample set and the epoch is never silently shorter; they count towards the run's limit of
  unreadable images (`engine.data.bad_images`). The check is cheap (`check_image`: JPEGs and
  PNGs with their signature and end marker pass on a few bytes, tens of thousands of files a
  second; other files are decoded by PIL). A file damaged in the middle, or after the scan, is
  caught at decode time, where both loaders skip it under the same policy.
- an empty class folder, or one whose every file was skipped: rejected with a `UserError` naming the
  folder; dropping the class would renumber every later label, keeping it would train a class
  that has no example.
- grayscale, palette, CMYK, RGBA, LA: converted to RGB 8-bit (alpha dropped, not composited), in
  `open_rgb` exactly as DALI's decoder does (`output_type=RGB`).
- 16-bit PNG (grey or colour): scaled to 8 bits as `round(v / 257)`, DALI's conversion. PIL alone
  would clip 16-bit grey at 255 and truncate 16-bit colour, so `open_rgb` decodes these with
  `torchvision.io`, which keeps the 16 bits.
- mixed sizes: fine; both paths resize every image on its own.
- EXIF orientation: ignored on both paths, as torchvision's `ImageFolder` and timm ignore it.
"""
from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .bad_images import BadImages
from .splits import Split

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

_log = logging.getLogger(__name__)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_EOI = b"\xff\xd9"


def scan_split(folder: Path, classes: list[str] | None = None,
               bad_images: BadImages | None = None) -> tuple[list[str], Split, list[str]]:
    """Return (classes, split, notes). `classes` pins the label order to another split's; the
    unreadable images are also recorded in `bad_images` (which may stop the scan at its limit)."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"image folder {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"image folder {folder} has classes the train split lacks: {', '.join(unknown[:5])}")

    per_class: list[tuple[int, Path, list[Path]]] = []
    non_images = 0
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue  # a class absent from a test split is allowed; an empty folder is not (below)
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        non_images += len(files) - len(images)
        per_class.append((label, class_dir, images))

    candidates = [p for _, _, images in per_class for p in images]
    problems = dict(zip(candidates, _check_all(candidates)))

    paths, labels, unreadable = [], [], []
    for label, class_dir, images in per_class:
        good = [p for p in images if problems[p] is None]
        bad = [p for p in images if problems[p] is not None]
        unreadable += bad
        if not good:
            why = f" ({len(bad)} unreadable, e.g. {bad[0].name}: {problems[bad[0]]})" if bad else ""
            raise UserError(f"class folder {class_dir} holds no readable images{why}; "
                            f"add images or remove the folder")
        paths += [str(p) for p in good]
        labels += [label] * len(good)

    notes = []
    if non_images:
        notes.append(f"{folder}: skipped {non_images} non-image files")
    if unreadable:
        shown = "; ".join(f"{p.relative_to(folder)} ({problems[p]})" for p in unreadable[:3])
        more = f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        notes.append(f"{folder}: skipped {len(unreadable)} unreadable images: {shown}{more}")
        for p in unreadable:
            _log.info("skipping unreadable image %s: %s", p, problems[p])
            if bad_images is not None:
                bad_images.add(p, problems[p], announce=False)  # the note names them
    return classes, Split(labels=np.asarray(labels, dtype=np.int64), paths=paths), notes


def _check_all(paths: list[Path]) -> list[str | None]:
    """`check_image` over many files; threads, because on a cold or network disk the wait is I/O."""
    if len(paths) < 64:
        return [check_image(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(check_image, paths))


def check_image(path: str | Path) -> str | None:
    """None when `path` decodes as an image, else a short reason (for the notes and errors).

    A JPEG or PNG that starts with its signature and ends with its end marker is accepted from those
    few bytes (a truncated download is the common failure, and it loses the end); anything else is
    decoded in full by PIL, which decides.
    """
    try:
        head, tail = _head_and_tail(path, 8, len(_JPEG_EOI) + 16)
        if head.startswith(b"\xff\xd8\xff") and _JPEG_EOI in tail:  # cameras may pad after EOI
            return None
        if head == _PNG_SIGNATURE and tail.endswith(_PNG_IEND):
            return None
        with Image.open(path) as img:
            img.load()
    except Image.DecompressionBombError:
        return "too many pixels"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in message or "end of" in message.lower():
            return "truncated"
        if "cannot identify" in message:
            return "not an image"
        return message[:80]
    return None


def _head_and_tail(path: str | Path, n_head: int, n_tail: int) -> tuple[bytes, bytes]:
    with open(path, "rb") as f:
        head = f.read(n_head)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - n_tail))
        return head, f.read(n_tail)


def open_rgb(path: str | Path) -> Image.Image:
    """The image at `path` as 8-bit RGB, converted the way DALI's decoder converts it."""
    data = Path(path).read_bytes()
    if data[:8] == _PNG_SIGNATURE and len(data) > 24 and data[24] == 16:  # IHDR bit depth
        return _png16_to_rgb(data)
    with Image.open(io.BytesIO(data)) as img:
        if img.mode.startswith("I;16"):  # 16-bit grey from other formats (TIFF)
            grey = np.asarray(img).astype(np.uint32)
            return Image.fromarray(_to_8bit(grey)).convert("RGB")
        return img.convert("RGB")


def _png16_to_rgb(data: bytes) -> Image.Image:
    import torch
    from torchvision.io import ImageReadMode, decode_png

    chw = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)  # (3, H, W) uint16
    hwc = chw.permute(1, 2, 0).numpy().astype(np.uint32)
    return Image.fromarray(_to_8bit(hwc), "RGB")


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit as round(v / 257), in integers (v / 257 never ends in exactly .5)."""
    return ((values + 128) // 257).astype(np.uint8)
