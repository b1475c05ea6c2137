"""Scanning an ImageFolder split, and opening its images as the torch loader and DALI both see them.

Class folders are read in sorted order (torchvision's `ImageFolder` order), so label `i` is the
i-th class name on both loader paths. What happens to awkward files, case by case:

- non-image files (`notes.txt`, `.DS_Store`, any suffix outside `IMAGE_SUFFIXES`): skipped, counted
  in `Domain.notes` (the run log prints it).
- undecodable images (a text file named `.jpg`, an empty file, a truncated JPEG or PNG): found at
  scan time and skipped, counted and named in the notes, so both loaders read the same, known
  sample set and the epoch is never silently shorter; they count towards the run's limit of
  unreadable images (`engine.data.bad_images`). The check is cheap (`check_image`: JPEGs and
  PNGs with their signature and end marker pass on a few bytes and their header, 15-25 us a
  file (a 500 x 375 photo, one core of a 2-core dev machine); other files are decoded by PIL). A file damaged in the middle, or after the scan, is
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
- large images: the scan reads each image's width and height from its header (no decoding) and
  applies PIL's decompression-bomb rule with the run's limit (`data.max_image_pixels`): above it,
  read and noted; above twice it, skipped as unreadable. `open_rgb` applies the same limit instead
  of PIL's global one, so the key, not `PIL.Image.MAX_IMAGE_PIXELS`, decides on both loaders.
- file and folder names that are not UTF-8: read like any other (Python holds them as surrogates),
  printed with `shown` (`caf\\xe9.png`).
"""
from __future__ import annotations

import io
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .bad_images import MAX_IMAGE_PIXELS, BadImages, many_pixels, pil_unlimited, shown, too_many_pixels
from .splits import Split

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

_log = logging.getLogger(__name__)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_EOI = b"\xff\xd9"


def scan_split(folder: Path, classes: list[str] | None = None, bad_images: BadImages | None = None,
               min_classes: int = 1) -> tuple[list[str], Split, list[str]]:
    """Return (classes, split, notes). `classes` pins the label order to another split's; the
    unreadable images are also recorded in `bad_images` (which may stop the scan at its limit), whose
    `max_pixels` is the image-size limit. Fewer than `min_classes` class folders is refused before
    any image is read (a target needs two: one class trains a head that learns nothing)."""
    max_pixels = bad_images.max_pixels if bad_images is not None else MAX_IMAGE_PIXELS
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"image folder {shown(folder)} has no class sub-folders "
                        f"(expected {shown(folder)}/<class>/<image>)")
    if len(found) < min_classes:
        raise UserError(f"image folder {shown(folder)} has {len(found)} class folder{'s' * (len(found) != 1)} "
                        f"({', '.join(map(shown, found))}), fewer than the {min_classes} a classifier needs; "
                        f"add class folders beside it")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"image folder {shown(folder)} has classes the train split lacks: "
                        f"{', '.join(map(shown, unknown[:5]))}")

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
    checked = dict(zip(candidates, _check_all(candidates, max_pixels)))
    problems = {p: problem for p, (problem, _) in checked.items()}

    paths, labels, unreadable = [], [], []
    for label, class_dir, images in per_class:
        good = [p for p in images if problems[p] is None]
        bad = [p for p in images if problems[p] is not None]
        unreadable += bad
        if not good:
            why = f" ({len(bad)} unreadable, e.g. {shown(bad[0].name)}: {problems[bad[0]]})" if bad else ""
            raise UserError(f"class folder {shown(class_dir)} holds no readable images{why}; "
                            f"add images or remove the folder")
        paths += [str(p) for p in good]
        labels += [label] * len(good)

    notes = []
    if non_images:
        notes.append(f"{shown(folder)}: skipped {non_images} non-image files")
    if unreadable:
        notes.append(f"{shown(folder)}: skipped {len(unreadable)} unreadable images: "
                     f"{_listed(folder, unreadable, problems)}")
        for p in unreadable:
            _log.info("skipping unreadable image %s: %s", shown(p), problems[p])
            if bad_images is not None:
                bad_images.add(p, problems[p], announce=False)  # the note names them
    large = [p for p, (problem, size) in checked.items() if problem is None and size and many_pixels(*size, max_pixels)]
    if large:
        sizes = {p: f"{checked[p][1][0]} x {checked[p][1][1]}" for p in large}
        notes.append(f"{shown(folder)}: {len(large)} images of more than data.max_image_pixels={max_pixels} "
                     f"pixels, read anyway (twice that is skipped): {_listed(folder, large, sizes)}")
    return classes, Split(labels=np.asarray(labels, dtype=np.int64), paths=paths), notes


def screen_listed(folder: Path, paths: list[Path], labels: list[int], classes: list[str],
                  bad_images: BadImages | None = None) -> tuple[Split, list[str]]:
    """A split of the files a data set's own lists name (every one of them exists: the caller checked),
    screened as `scan_split` screens a folder: unreadable images skipped, named in the notes and
    recorded in `bad_images`; a class left with no readable image refused, naming the class."""
    max_pixels = bad_images.max_pixels if bad_images is not None else MAX_IMAGE_PIXELS
    checked = dict(zip(paths, _check_all(paths, max_pixels)))
    problems = {p: problem for p, (problem, _) in checked.items()}
    unreadable = [p for p in paths if problems[p] is not None]
    kept = [i for i, p in enumerate(paths) if problems[p] is None]
    for label in sorted(set(labels) - {labels[i] for i in kept}):
        bad = next(p for p, y in zip(paths, labels) if y == label)
        raise UserError(f"class {shown(classes[label])} of {shown(folder)} holds no readable images "
                        f"(e.g. {shown(bad)}: {problems[bad]}); replace them")
    notes = []
    if unreadable:
        notes.append(f"{shown(folder)}: skipped {len(unreadable)} unreadable images: "
                     f"{_listed(folder, unreadable, problems)}")
        for p in unreadable:
            _log.info("skipping unreadable image %s: %s", shown(p), problems[p])
            if bad_images is not None:
                bad_images.add(p, problems[p], announce=False)  # the note names them
    large = [p for p in paths if problems[p] is None and checked[p][1] and many_pixels(*checked[p][1], max_pixels)]
    if large:
        sizes = {p: f"{checked[p][1][0]} x {checked[p][1][1]}" for p in large}
        notes.append(f"{shown(folder)}: {len(large)} images of more than data.max_image_pixels={max_pixels} "
                     f"pixels, read anyway (twice that is skipped): {_listed(folder, large, sizes)}")
    split = Split(labels=np.asarray([labels[i] for i in kept], dtype=np.int64), paths=[str(paths[i]) for i in kept])
    return split, notes


def _listed(folder: Path, paths: list[Path], why: dict[Path, str], first: int = 3) -> str:
    shown_ = "; ".join(f"{shown(p.relative_to(folder))} ({why[p]})" for p in paths[:first])
    return shown_ + (f"; and {len(paths) - first} more" if len(paths) > first else "")


def _check_all(paths: list[Path], max_pixels: int | None) -> list[tuple[str | None, tuple[int, int] | None]]:
    """`inspect_image` over many files; threads, because on a cold or network disk the wait is I/O."""
    if len(paths) < 64:
        return [inspect_image(p, max_pixels) for p in paths]
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(inspect_image, paths, [max_pixels] * len(paths)))


def check_image(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> str | None:
    """None when `path` decodes as an image within the size limit, else a short reason (for the notes and errors)."""
    return inspect_image(path, max_pixels)[0]


def inspect_image(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS
                  ) -> tuple[str | None, tuple[int, int] | None]:
    """(None or why `path` is unreadable, its (width, height) where known).

    A JPEG or PNG that starts with its signature and ends with its end marker is accepted from those
    few bytes and its header (a truncated download is the common failure, and it loses the end);
    anything else is opened by PIL, which reads its size, and decoded in full, which decides. An
    image of more than twice `max_pixels` is refused from its header, before any decoding.
    """
    size = None
    try:
        size = _marked_size(path)
        if size is not None:
            return too_many_pixels(*size, max_pixels), size
        with pil_unlimited(), Image.open(path) as img:
            size = img.size
            if too_many_pixels(*size, max_pixels):
                return too_many_pixels(*size, max_pixels), size
            img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in message or "end of" in message.lower():
            return "truncated", size
        if "cannot identify" in message:
            return "not an image", size
        return message[:80], size
    return None, size


def _marked_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of a JPEG or PNG that starts with its signature and ends with its end marker,
    read from its header; None for any other file."""
    with open(path, "rb") as f:
        head = f.read(24)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - len(_JPEG_EOI) - 16))
        tail = f.read()
        if head.startswith(b"\xff\xd8\xff") and _JPEG_EOI in tail:  # cameras may pad after EOI
            return _jpeg_size(f)
        if head[:8] == _PNG_SIGNATURE and tail.endswith(_PNG_IEND) and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(f) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (SOFn), walking the segments before it; None when
    the walk goes wrong (PIL then reads the file)."""
    f.seek(2)
    for _ in range(1000):
        marker = f.read(2)
        while marker == b"\xff\xff":  # fill bytes before a marker
            marker = b"\xff" + f.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        if 0xD0 <= marker[1] <= 0xD8 or marker[1] == 0x01:  # markers without a segment
            continue
        length = f.read(2)
        if len(length) < 2 or marker[1] == 0xDA:  # scan data before any frame header
            return None
        if marker[1] in _JPEG_SOF:
            frame = f.read(5)  # precision, height, width
            height, width = struct.unpack(">HH", frame[1:5]) if len(frame) == 5 else (0, 0)
            return (width, height) if width and height else None
        f.seek(struct.unpack(">H", length)[0] - 2, os.SEEK_CUR)
    return None


def open_rgb(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at `path` as 8-bit RGB, converted the way DALI's decoder converts it; ValueError,
    before decoding, for one of more than twice `max_pixels` (`engine.data.bad_images`)."""
    data = Path(path).read_bytes()
    if data[:8] == _PNG_SIGNATURE and len(data) > 24 and data[24] == 16:  # IHDR bit depth
        _refuse_too_many(struct.unpack(">II", data[16:24]), max_pixels)
        return _png16_to_rgb(data)
    with pil_unlimited(), Image.open(io.BytesIO(data)) as img:
        _refuse_too_many(img.size, max_pixels)
        if img.mode.startswith("I;16"):  # 16-bit grey from other formats (TIFF)
            grey = np.asarray(img).astype(np.uint32)
            return Image.fromarray(_to_8bit(grey)).convert("RGB")
        return img.convert("RGB")


def _refuse_too_many(size: tuple[int, int], max_pixels: int | None) -> None:
    reason = too_many_pixels(*size, max_pixels)
    if reason:
        raise ValueError(reason)


def _png16_to_rgb(data: bytes) -> Image.Image:
    import torch
    from torchvision.io import ImageReadMode, decode_png

    chw = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)  # (3, H, W) uint16
    hwc = chw.permute(1, 2, 0).numpy().astype(np.uint32)
    return Image.fromarray(_to_8bit(hwc), "RGB")


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit as round(v / 257), in integers (v / 257 never ends in exactly .5)."""
    return ((values + 128) // 257).astype(np.uint8)
