"""Helpers that write small image folders with PIL: good images of mixed sizes and every kind of bad file."""
import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import Preprocess, resolve_loader

# 32 px at crop_pct 0.875: every image is resized (short side 36) and centre-cropped.
PRE = Preprocess(input_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875)
# A lock the test holds while a loader's workers start: a worker forked from the test process
# would inherit it held (what hung CI), one started from a clean process finds it free.
HELD_IN_PARENT = threading.Lock()
needs_dali = pytest.mark.skipif(resolve_loader("auto") != "dali", reason="NVIDIA DALI is not installed or does not run here")
BOTH = ["torch", pytest.param("dali", marks=needs_dali)]  # the loaders, as a parameter


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of `loader`: (all images, all labels)."""
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


class NeedsTheLock:
    """A transform that takes `HELD_IN_PARENT` for a moment before applying `transform`."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img):
        if not HELD_IN_PARENT.acquire(timeout=5):
            raise RuntimeError("this worker inherited the lock its parent held when it started")
        HELD_IN_PARENT.release()
        return self.transform(img)


SIZES = [(40, 30), (64, 48), (50, 70), (33, 33), (90, 41), (36, 37)]  # (width, height)


def photo(rng: np.random.Generator, width: int, height: int, channels: int = 3) -> np.ndarray:
    """A photo-like uint8 image: a smooth random colour field plus a little grain."""
    low = rng.integers(0, 256, (4, 5, channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else ("RGBA" if channels == 4 else "L")
    field = Image.fromarray(low.squeeze(-1) if channels == 1 else low, mode).resize((width, height), Image.BICUBIC)
    grain = rng.integers(-4, 5, (height, width) + ((channels,) if channels > 1 else ()))
    arr = np.asarray(field, dtype=np.int16) + grain
    return np.clip(arr, 0, 255).astype(np.uint8)


def write_png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3) uint16): PIL cannot write 16-bit colour itself."""
    h, w = values.shape[:2]
    colour_type = 0 if values.ndim == 2 else 2
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def truncated_jpeg(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo(rng, 64, 48)).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def write_good_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 4, seed: int = 0) -> Path:
    """root/<class>/<i>.jpg, JPEGs of mixed sizes (and orientation)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = SIZES[(c + i) % len(SIZES)]
            Image.fromarray(photo(rng, w, h)).save(root / name / f"{i}.jpg", quality=95)
    return root


def write_awkward_images(folder: Path, seed: int = 1) -> dict[str, Path]:
    """Readable images that need converting: grey, RGBA, LA, palette, CMYK, 16-bit grey and colour;
    and a JPEG whose EXIF asks for a rotation."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rgb, rgba = photo(rng, 40, 30), photo(rng, 30, 40, channels=4)
    grey16 = photo(rng, 44, 36, channels=1).astype(np.uint16) * 256 + rng.integers(0, 256, (36, 44), dtype=np.uint16)
    files = {
        "grey": folder / "grey.png", "rgba": folder / "rgba.png", "la": folder / "la.png",
        "palette": folder / "palette.png", "cmyk": folder / "cmyk.jpg", "grey_jpeg": folder / "grey.jpg",
        "grey16": folder / "grey16.png", "rgb16": folder / "rgb16.png",
    }
    Image.fromarray(photo(rng, 38, 34, channels=1), "L").save(files["grey"])
    Image.fromarray(rgba, "RGBA").save(files["rgba"])
    Image.fromarray(rgba, "RGBA").convert("LA").save(files["la"])
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(files["palette"])
    Image.fromarray(rgb).convert("CMYK").save(files["cmyk"], quality=95)
    Image.fromarray(rgb).convert("L").save(files["grey_jpeg"], quality=95)
    Image.fromarray(grey16).save(files["grey16"])  # PIL writes mode I;16 as a 16-bit grey PNG
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° to display": ignored by both paths, as torchvision's ImageFolder does
    files["exif_rotated"] = folder / "rotated.jpg"
    Image.fromarray(photo(rng, 48, 30)).save(files["exif_rotated"], quality=95, exif=exif)
    write_png16(files["rgb16"], photo(rng, 42, 35).astype(np.uint16) * 256 + 100)
    return files


def write_broken_files(folder: Path, seed: int = 2) -> dict[str, Path]:
    """Files with an image suffix that do not decode, and files that are not images at all."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(photo(rng, 50, 40)).save(png, "PNG")
    files = {"truncated_jpeg": folder / "cut.jpg", "truncated_png": folder / "cut.png",
             "text_as_jpeg": folder / "notes.jpg", "empty": folder / "empty.jpeg"}
    files["truncated_jpeg"].write_bytes(truncated_jpeg(rng))
    files["truncated_png"].write_bytes(png.getvalue()[: len(png.getvalue()) * 2 // 3])
    files["text_as_jpeg"].write_text("not a picture\n")
    files["empty"].write_bytes(b"")
    (folder / "README.txt").write_text("a text file among the images\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    return files
