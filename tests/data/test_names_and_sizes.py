"""File names the file system gives (not UTF-8, a line break) and image sizes (PIL's decompression-bomb
rule, with the run's limit): one policy on both loaders."""
import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import DataConfig
from engine.data import make_loader
from engine.data.bad_images import MAX_IMAGE_PIXELS, BadImages
from engine.data.imagefolder import check_image, open_rgb, scan_split
from engine.errors import UserError

from data_fixtures import BOTH, PRE, all_batches, needs_dali, photo, write_good_folder, write_png16

CAFE = b"caf\xe9"  # Latin-1 bytes: not UTF-8


def write_bytes(folder: Path, name: bytes, data: bytes) -> Path:
    """A file whose name is raw bytes (what another system may leave on a disk); its path as Python holds it."""
    os.makedirs(os.fsencode(folder), exist_ok=True)
    with open(os.fsencode(folder) + b"/" + name, "wb") as f:
        f.write(data)
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name))


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def corrupted_mid_file(data: bytes) -> bytes:
    """The first half of a JPEG's image data cut out: header and end marker intact, so the scan passes it."""
    scan = data.index(b"\xff\xda")
    return data[:scan + 2] + data[(scan + len(data)) // 2:]


def printable(message: str) -> bool:
    """Whether `message` prints on a UTF-8 terminal, on one line (a name held as surrogates does not)."""
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\n" not in message


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says `width` x `height` (8-bit RGB), with one empty data chunk: what the scan reads."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


# --- names ---------------------------------------------------------------------------------------

def twin_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two folders of the same images: one named plainly, one with a class folder and a file whose
    names are not UTF-8 (in the same sorted places)."""
    rng = np.random.default_rng(0)
    plain = write_good_folder(tmp_path / "plain", classes=("a", "b"), per_class=2)
    odd = write_good_folder(tmp_path / "odd", classes=("a",), per_class=2)
    (plain / "b").rename(Path(os.fsdecode(os.fsencode(odd) + b"/b" + CAFE)))
    pixels = encoded(photo(rng, 40, 30))
    (plain / "b").mkdir()
    for i in range(2):  # the renamed class's JPEGs again, for the plain twin
        (plain / "b" / f"{i}.jpg").write_bytes(Path(os.fsdecode(os.fsencode(odd) + b"/b" + CAFE + f"/{i}.jpg".encode())).read_bytes())
    (plain / "b" / "cafe.png").write_bytes(pixels)
    write_bytes(Path(os.fsdecode(os.fsencode(odd) + b"/b" + CAFE)), CAFE + b".png", pixels)
    return plain, odd


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_names_that_are_not_utf8_are_read_like_any_other(tmp_path, name, train):
    plain, odd = twin_folders(tmp_path)
    splits = [scan_split(folder)[1] for folder in (plain, odd)]
    assert len(splits[1]) == 5 and any(os.fsencode(CAFE + b".png") in os.fsencode(p) for p in splits[1].paths)
    x_plain, y_plain = all_batches(make_loader(splits[0], PRE, train=train, batch_size=2, loader=name, seed=1))
    x_odd, y_odd = all_batches(make_loader(splits[1], PRE, train=train, batch_size=2, loader=name, seed=1))
    assert y_odd.tolist() == y_plain.tolist() and torch.equal(x_odd, x_plain)


@pytest.mark.parametrize("name", BOTH)
def test_an_unreadable_image_whose_name_is_not_utf8_is_skipped_and_named_printably(tmp_path, name):
    """Damaged mid-file, so only the loader finds it; DALI's message then holds bytes that are not UTF-8."""
    rng = np.random.default_rng(1)
    folder = write_good_folder(tmp_path / "f", classes=("a", "b"), per_class=3)
    write_bytes(folder / "a", CAFE + b".jpg", corrupted_mid_file(encoded(photo(rng, 64, 48), "JPEG")))
    _, split, _ = scan_split(folder)
    said = []
    loader = make_loader(split, PRE, train=False, batch_size=2, loader=name, bad_images=BadImages(1, say=said.append))
    assert all_batches(loader)[1].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(said) == 1 and printable(said[0]) and "a/caf\\xe9.jpg (" in said[0]
    with pytest.raises(UserError) as error:  # past the limit: the list, printable
        all_batches(make_loader(split, PRE, train=False, batch_size=2, loader=name, bad_images=BadImages(0)))
    assert printable(str(error.value)) and "caf\\xe9.jpg" in str(error.value)


def test_the_scan_names_a_broken_file_whose_name_is_not_utf8_printably(tmp_path):
    folder = write_good_folder(tmp_path / "f", classes=("a", "b"), per_class=2)
    write_bytes(folder / "b", CAFE + b".jpg", b"not a picture\n")
    bad = BadImages(limit=0)
    with pytest.raises(UserError) as error:
        scan_split(folder, bad_images=bad)
    assert printable(str(error.value)) and "caf\\xe9.jpg (not an image)" in str(error.value)
    _, split, notes = scan_split(folder, bad_images=BadImages(limit=1))
    assert len(split) == 4 and printable(notes[0]) and "b/caf\\xe9.jpg (not an image)" in notes[0]


@needs_dali
def test_dali_refuses_a_name_with_a_line_break_in_one_line_before_reading_and_torch_reads_it(tmp_path):
    folder = write_good_folder(tmp_path / "f", classes=("a", "b"), per_class=2)
    (folder / "b" / "two\nlines.png").write_bytes(encoded(photo(np.random.default_rng(2), 40, 30)))
    _, split, _ = scan_split(folder)
    with pytest.raises(UserError) as error:
        make_loader(split, PRE, train=False, batch_size=2, loader="dali")
    message = str(error.value)
    assert printable(message) and "two\\nlines.png" in message and message.endswith("or use --loader torch")
    assert all_batches(make_loader(split, PRE, train=False, batch_size=2, loader="torch"))[1].tolist() == [0, 0, 1, 1, 1]


@needs_dali
def test_dali_names_a_file_of_a_relative_folder_as_the_scan_did(tmp_path, monkeypatch):
    """DALI reads absolute paths; the file it cannot decode is recorded under the split's own path."""
    monkeypatch.chdir(tmp_path)
    folder = write_good_folder(Path("f"), classes=("a", "b"), per_class=2)
    (folder / "b" / "x.jpg").write_bytes(corrupted_mid_file(encoded(photo(np.random.default_rng(3), 64, 48), "JPEG")))
    _, split, _ = scan_split(folder)
    bad = BadImages(limit=1)
    assert all_batches(make_loader(split, PRE, train=False, batch_size=2, loader="dali", bad_images=bad))[1].tolist() \
        == [0, 0, 1, 1]
    assert list(bad.found) == [os.path.join("f", "b", "x.jpg")]


# --- sizes ---------------------------------------------------------------------------------------

LIMIT = 64 * 64  # warn above 4,096 pixels, skip above 8,192


def test_the_default_limit_is_pils():
    assert MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS == DataConfig().max_image_pixels == BadImages().max_pixels


def sized_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two classes of small JPEGs, a 100 x 100 PNG in class a (more than twice LIMIT) and an 80 x 80
    one in class b (above LIMIT, below twice it)."""
    rng = np.random.default_rng(4)
    folder = write_good_folder(tmp_path / "f", classes=("a", "b"), per_class=2)
    big, large = folder / "a" / "big.png", folder / "b" / "large.png"
    big.write_bytes(encoded(photo(rng, 100, 100)))
    large.write_bytes(encoded(photo(rng, 80, 80)))
    return folder, big, large


@pytest.mark.parametrize("name", BOTH)
def test_an_image_over_twice_the_limit_is_skipped_and_named_and_one_over_it_is_read_with_a_note(tmp_path, name):
    folder, big, large = sized_folder(tmp_path)
    bad = BadImages(limit=1, max_pixels=LIMIT)
    _, split, notes = scan_split(folder, bad_images=bad)
    assert bad.found == {str(big): "too many pixels: 100 x 100, more than twice data.max_image_pixels=4096"}
    assert notes == [f"{folder}: skipped 1 unreadable images: a/big.png ({bad.found[str(big)]})",
                     f"{folder}: 1 images of more than data.max_image_pixels=4096 pixels, read anyway "
                     f"(twice that is skipped): b/large.png (80 x 80)"]
    assert str(big) not in split.paths and str(large) in split.paths
    x, y = all_batches(make_loader(split, PRE, train=False, batch_size=2, loader=name, bad_images=bad))
    assert y.tolist() == [0, 0, 1, 1, 1] and len(bad) == 1


def test_past_max_bad_images_an_image_over_twice_the_limit_stops_the_scan(tmp_path):
    folder, big, _ = sized_folder(tmp_path)
    with pytest.raises(UserError, match=re.escape(f"{big} (too many pixels: 100 x 100, more than twice "
                                                  f"data.max_image_pixels=4096)")):
        scan_split(folder, bad_images=BadImages(limit=0, max_pixels=LIMIT))


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize("max_pixels", [None, 0, LIMIT])
def test_the_limit_not_pils_global_decides_on_both_loaders(tmp_path, monkeypatch, name, max_pixels):
    """PIL's process-wide limit at 1,000 pixels would refuse the 80 x 80 image (6,400 > 2 x 1,000);
    the run's limit reads it, and PIL's setting is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder, big, large = sized_folder(tmp_path)
    big.unlink()
    bad = BadImages(limit=0, max_pixels=max_pixels)
    _, split, _ = scan_split(folder, bad_images=bad)
    assert all_batches(make_loader(split, PRE, train=True, batch_size=5, loader=name, bad_images=bad))[1].numel() == 5
    assert sorted(np.asarray(open_rgb(large, max_pixels)).shape) == [3, 80, 80]
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_the_torch_path_refuses_an_image_over_twice_the_limit_before_decoding(tmp_path):
    """What the torch loader meets when a file grew after the scan; 16-bit PNGs (decoded by torchvision) too."""
    folder, big, _ = sized_folder(tmp_path)
    write_png16(folder / "b16.png", np.zeros((100, 100), np.uint16))
    for path in (big, folder / "b16.png"):
        with pytest.raises(ValueError, match="too many pixels: 100 x 100, more than twice data.max_image_pixels=4096"):
            open_rgb(path, LIMIT)


def test_at_pils_default_a_png_claiming_14000_squared_is_skipped_and_12000_squared_read_with_a_note(tmp_path):
    """The scan reads sizes from headers: these PNGs hold no pixels at all, and nothing decodes them."""
    folder = write_good_folder(tmp_path / "f", classes=("a", "b"), per_class=1)
    (folder / "a" / "huge.png").write_bytes(png_header_only(14000, 14000))
    (folder / "b" / "big.png").write_bytes(png_header_only(12000, 12000))
    bad = BadImages(limit=1)
    _, split, notes = scan_split(folder, bad_images=bad)
    assert bad.found == {str(folder / "a" / "huge.png"):
                         "too many pixels: 14000 x 14000, more than twice data.max_image_pixels=89478485"}
    assert notes[1].endswith("b/big.png (12000 x 12000)") and len(split) == 3
    assert check_image(folder / "a" / "huge.png", max_pixels=0) is None  # no limit
