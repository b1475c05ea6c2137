"""ImageFolder scanning: label order, and what happens to every kind of bad file."""
import numpy as np
import pytest
from PIL import Image

from engine.data import load_domain
from engine.errors import UserError
from engine.data.imagefolder import check_image, open_rgb, scan_split

from data_fixtures import photo, write_broken_files, write_good_folder


def test_labels_follow_torchvision_image_folder_order(good_folder):
    from torchvision.datasets import ImageFolder

    classes, split, notes = scan_split(good_folder)
    reference = ImageFolder(str(good_folder))
    assert classes == reference.classes
    assert split.paths == [p for p, _ in reference.samples]
    assert split.labels.tolist() == [y for _, y in reference.samples]
    assert notes == []


def test_non_image_files_are_skipped_and_counted(messy_folder):
    root, _, _ = messy_folder
    _, split, notes = scan_split(root)
    assert not any(p.endswith((".txt", ".DS_Store")) for p in split.paths)
    assert any("skipped 2 non-image files" in n for n in notes)


def test_undecodable_images_are_skipped_and_named_in_the_notes(messy_folder):
    root, awkward, broken = messy_folder
    _, split, notes = scan_split(root)
    kept = set(split.paths)
    assert not kept & {str(p) for p in broken.values()}
    assert {str(p) for p in awkward.values()} <= kept          # readable, converted later
    note = next(n for n in notes if "unreadable" in n)
    assert f"skipped {len(broken)} unreadable images" in note and "dog/cut.jpg (truncated)" in note


@pytest.mark.parametrize("case, reason", [("truncated_jpeg", "truncated"), ("truncated_png", "truncated"),
                                          ("text_as_jpeg", "not an image"), ("empty", "not an image")])
def test_check_image_says_why_a_file_is_unreadable(tmp_path, case, reason):
    broken = write_broken_files(tmp_path)
    assert check_image(broken[case]) == reason


def test_jpeg_with_bytes_after_the_end_marker_is_kept(tmp_path):
    path = tmp_path / "padded.jpg"
    Image.fromarray(photo(np.random.default_rng(0), 40, 30)).save(path)
    path.write_bytes(path.read_bytes() + b"\x00" * 100)  # some cameras pad their files
    assert check_image(path) is None


def test_empty_class_folder_is_rejected_naming_it(good_folder):
    (good_folder / "fox").mkdir()
    with pytest.raises(UserError, match=r"fox holds no readable images"):
        scan_split(good_folder)


def test_class_of_only_broken_files_is_rejected_naming_one(good_folder):
    write_broken_files(good_folder / "fox")
    with pytest.raises(UserError, match=r"fox holds no readable images \(4 unreadable, e\.g\."):
        scan_split(good_folder)


def test_notes_reach_the_domain(tmp_path):
    for split in ("train", "val"):
        write_good_folder(tmp_path / split)
    write_broken_files(tmp_path / "val" / "cat")
    domain = load_domain(f"imagefolder:{tmp_path}")
    assert len(domain.test) == 12 and len(domain.train) == 12
    assert any("val: skipped 4 unreadable images" in n for n in domain.notes)


@pytest.mark.parametrize("case", ["grey", "rgba", "la", "palette", "cmyk", "grey_jpeg", "grey16", "rgb16",
                                  "exif_rotated"])
def test_awkward_images_open_as_8bit_rgb(messy_folder, case):
    _, awkward, _ = messy_folder
    image = open_rgb(awkward[case])
    assert image.mode == "RGB"
    if case in ("grey", "grey_jpeg", "grey16", "la"):
        rgb = np.asarray(image)
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_16_bit_png_scales_to_8_bits_by_rounding(messy_folder):
    _, awkward, _ = messy_folder
    grey16 = np.asarray(Image.open(awkward["grey16"])).astype(np.int64)        # (H, W) 0..65535
    assert grey16.max() > 255                                                   # really 16-bit
    expected = np.round(grey16 / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(open_rgb(awkward["grey16"]))[..., 0], expected)


def test_open_rgb_equals_dalis_decoder(messy_folder):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    _, awkward, _ = messy_folder
    files = [str(p) for p in awkward.values()]

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
    def decode():
        encoded, _ = fn.readers.file(files=files)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)

    pipe = decode()
    pipe.build()
    (decoded,) = pipe.run()
    for i, path in enumerate(files):
        assert np.array_equal(np.asarray(decoded[i]), np.asarray(open_rgb(path))), path


def test_unreadable_images_of_the_scan_count_towards_the_runs_limit(messy_folder):
    from engine.data.bad_images import BadImages

    root, _, broken = messy_folder
    bad = BadImages(limit=len(broken))
    scan_split(root, bad_images=bad)
    assert set(bad.found) == {str(p) for p in broken.values()}
    with pytest.raises(UserError, match=rf"^{len(broken)} unreadable images, more than data.max_bad_images=3: "):
        scan_split(root, bad_images=BadImages(limit=len(broken) - 1))
