"""DTD, Flowers102 and Food101 read from their official layouts, written here in miniature (a few tiny
JPEGs per class, the metadata in its real formats: text lists, MATLAB .mat files, JSON)."""
import json

import numpy as np
import pytest
import scipy.io
from PIL import Image

from engine.data import load_domain, make_loader, num_classes
from engine.errors import UserError
from engine.run import main

from data.data_fixtures import BOTH, PRE, all_batches

DTD_CLASSES = ["banded", "zigzagged", "cracked"]  # not in sorted order: the reader sorts, as torchvision does
FOOD_CLASSES = ["waffles", "apple_pie", "sushi"]  # classes.txt's order is the label order


def _jpeg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, 255 - value, 60)).save(path, "JPEG")


def write_dtd(root, partitions=(1, 2)):
    """dtd/dtd/images/<class>/<class>_000k.jpg (6 a class) and labels/{train,val,test}<N>.txt, whose
    lists rotate the six images over the splits by partition: train 3, val 2, test 1 a class."""
    base = root / "dtd" / "dtd"
    for c, name in enumerate(DTD_CLASSES):
        for k in range(6):
            _jpeg(base / "images" / name / f"{name}_{k:04d}.jpg", 40 * c + k)
    for n in partitions:
        for split, picks in (("train", (0, 1, 2)), ("val", (3, 4)), ("test", (5,))):
            lines = [f"{name}/{name}_{(k + n - 1) % 6:04d}.jpg" for name in DTD_CLASSES for k in picks]
            (base / "labels").mkdir(parents=True, exist_ok=True)
            (base / "labels" / f"{split}{n}.txt").write_text("\n".join(lines) + "\n")
    return base


def write_flowers(root):
    """flowers-102/jpg/image_00001..00012.jpg, imagelabels.mat (labels 1..3 as MATLAB stores them: a
    1 x N row) and setid.mat (trnid, valid, tstid: 1-based image numbers)."""
    base = root / "flowers-102"
    labels = np.array([[3, 1, 2, 1, 2, 3, 1, 2, 3, 3, 1, 2]], dtype=np.uint8)
    for i in range(1, labels.size + 1):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg", 20 * i)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels})
    sets = {"trnid": [1, 2, 3, 4, 5, 6], "valid": [7, 8, 9], "tstid": [10, 11, 12]}
    scipy.io.savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in sets.items()})
    return base, labels[0], sets


def write_food(root, form="json"):
    """food-101/images/<class>/<id>.jpg (4 a class), meta/classes.txt, and meta/{train,test}.json (or .txt)."""
    base = root / "food-101"
    split_of = {"train": (0, 1, 2), "test": (3,)}
    listed = {split: {name: [f"{name}/{100 + k}" for k in ks] for name in FOOD_CLASSES}
              for split, ks in split_of.items()}
    for c, name in enumerate(FOOD_CLASSES):
        for k in range(4):
            _jpeg(base / "images" / name / f"{100 + k}.jpg", 50 * c + k)
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "classes.txt").write_text("\n".join(FOOD_CLASSES) + "\n")
    for split, by_class in listed.items():
        if form == "json":
            (base / "meta" / f"{split}.json").write_text(json.dumps(by_class))
        else:
            (base / "meta" / f"{split}.txt").write_text("\n".join(e for v in by_class.values() for e in v) + "\n")
    return base


def _folder_labels(split, classes):
    """Each image's label as its class folder names it."""
    return [classes.index(p.split("/")[-2]) for p in split.paths]


def test_dtd_reads_partition_1_by_default_with_its_official_val_split(tmp_path):
    write_dtd(tmp_path)
    d = load_domain("dtd", tmp_path)
    assert d.classes == sorted(DTD_CLASSES) and d.num_classes == 3
    assert (len(d.train), len(d.val), len(d.test)) == (9, 6, 3)
    for split in (d.train, d.val, d.test):
        assert split.labels.tolist() == _folder_labels(split, d.classes)
    assert sorted(p.rsplit("/", 1)[1] for p in d.test.paths) == ["banded_0005.jpg", "cracked_0005.jpg",
                                                                  "zigzagged_0005.jpg"]


def test_dtd_partition_picks_the_other_lists(tmp_path):
    write_dtd(tmp_path)
    d = load_domain("dtd", tmp_path, dtd_partition=2)
    assert sorted(p.rsplit("/", 1)[1] for p in d.test.paths) == ["banded_0000.jpg", "cracked_0000.jpg",
                                                                  "zigzagged_0000.jpg"]
    with pytest.raises(UserError, match="missing .*labels/train3.txt"):
        load_domain("dtd", tmp_path, dtd_partition=3)


def test_flowers102_labels_and_splits_follow_the_mat_files(tmp_path):
    base, labels, sets = write_flowers(tmp_path)
    d = load_domain("flowers102", tmp_path)
    assert d.num_classes == 3
    for split, key in ((d.train, "trnid"), (d.val, "valid"), (d.test, "tstid")):
        assert split.paths == [str(base / "jpg" / f"image_{i:05d}.jpg") for i in sets[key]]
        assert split.labels.tolist() == [labels[i - 1] - 1 for i in sets[key]]


def test_flowers102_names_are_the_oxford_names_where_torchvision_has_them(tmp_path):
    from torchvision.datasets import Flowers102
    write_flowers(tmp_path)
    names = getattr(Flowers102, "classes", None)
    expected = names[:3] if names else ["1", "2", "3"]
    assert load_domain("flowers102", tmp_path).classes == expected


@pytest.mark.parametrize("form", ["json", "txt"])
def test_food101_reads_its_lists_in_classes_txt_order(tmp_path, form):
    write_food(tmp_path, form)
    d = load_domain("food101", tmp_path)
    assert d.classes == FOOD_CLASSES and d.val is None  # the run holds data.val_fraction of train out
    assert (len(d.train), len(d.test)) == (9, 3)
    for split in (d.train, d.test):
        assert split.labels.tolist() == _folder_labels(split, d.classes)
    assert sorted(p.rsplit("/", 1)[1] for p in d.test.paths) == ["103.jpg"] * 3


@pytest.mark.parametrize("name, write, remove, expected", [
    ("dtd", write_dtd, "dtd/dtd/labels/val1.txt", "dtd/dtd/images/<class>/<name>.jpg"),
    ("dtd", write_dtd, "dtd/dtd/images/cracked/cracked_0004.jpg", "dtd/dtd/labels/{train,val,test}<N>.txt"),
    ("flowers102", write_flowers, "flowers-102/setid.mat", "flowers-102/jpg/image_NNNNN.jpg"),
    ("flowers102", write_flowers, "flowers-102/jpg/image_00011.jpg", "imagelabels.mat and setid.mat"),
    ("food101", write_food, "food-101/meta/classes.txt", "food-101/images/<class>/<id>.jpg"),
    ("food101", write_food, "food-101/meta/test.json", "meta/{train,test}.json or .txt"),
    ("food101", write_food, "food-101/images/sushi/101.jpg", "meta/classes.txt"),
])
def test_a_partial_layout_is_refused_naming_the_first_missing_file_and_the_layout(tmp_path, name, write, remove,
                                                                                 expected):
    write(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(UserError) as e:
        load_domain(name, tmp_path)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{name}: missing {tmp_path / remove};")
    assert f"expected {tmp_path}/" in line and expected in line and "--data-root" in line


@pytest.mark.parametrize("name", ["dtd", "flowers102", "food101"])
def test_an_absent_data_set_is_refused_before_any_work(tmp_path, capsys, name):
    code = main(["--strategy", "linear", "--target", name, "--data-root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "runs"), "--name", "bad"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{name}: missing {tmp_path / 'none'}/" in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_unreadable_listed_images_are_skipped_and_named(tmp_path):
    write_dtd(tmp_path)
    bad = tmp_path / "dtd/dtd/images/banded/banded_0001.jpg"
    bad.write_bytes(b"not a jpeg")
    d = load_domain("dtd", tmp_path)
    assert len(d.train) == 8 and str(bad) not in d.train.paths
    assert any("skipped 1 unreadable images: banded/banded_0001.jpg" in n for n in d.notes)


@pytest.mark.parametrize("bad, message", [
    ({"dtd/dtd/labels/train1.txt": "banded\n"}, "lists 'banded'; each entry must be <class>/<image>"),
    ({"food-101/meta/train.json": "{not json"}, "cannot read .*train.json as JSON"),
    ({"food-101/meta/classes.txt": "waffles\nsushi\n"}, "lists class 'apple_pie', which .*classes.txt lacks"),
    ({"flowers-102/setid.mat": b"MATLAB? no"}, "cannot read .*setid.mat as a MATLAB file"),
])
def test_malformed_metadata_is_refused_naming_the_file(tmp_path, bad, message):
    (relative, content), = bad.items()
    name = {"dtd": "dtd", "food-101": "food101", "flowers-102": "flowers102"}[relative.split("/")[0]]
    {"dtd": write_dtd, "food101": write_food, "flowers102": write_flowers}[name](tmp_path)
    path = tmp_path / relative
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_domain(name, tmp_path)


def test_flowers_set_ids_beyond_the_labels_are_refused(tmp_path):
    base, _, _ = write_flowers(tmp_path)
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]),
                                          "tstid": np.array([[13]])})
    with pytest.raises(UserError, match="'tstid' names image 13, but .* labels only 12 images"):
        load_domain("flowers102", tmp_path)


@pytest.mark.parametrize("loader", BOTH)
@pytest.mark.parametrize("name, write", [("dtd", write_dtd), ("flowers102", write_flowers), ("food101", write_food)])
def test_both_loaders_read_the_splits(tmp_path, loader, name, write):
    write(tmp_path)
    d = load_domain(name, tmp_path)
    images, labels = all_batches(make_loader(d.test, PRE, train=False, batch_size=4, loader=loader))
    assert images.shape == (len(d.test), 3, 32, 32)
    assert labels.tolist() == d.test.labels.tolist()


@pytest.mark.parametrize("name, count", [("dtd", 47), ("flowers102", 102), ("food101", 101)])
def test_the_registry_knows_the_class_counts_without_the_data(tmp_path, capsys, name, count):
    assert num_classes(name) == count
    code = main(["--dry-run", "--strategy", "linear", "--target", name, "--data-root", str(tmp_path / "none")])
    assert code == 0 and f"({count} classes)" in capsys.readouterr().out


def test_bad_dtd_partition_is_refused(capsys):
    code = main(["--dry-run", "--strategy", "linear", "--target", "dtd", "data.dtd_partition=11"])
    assert code == 2 and "data.dtd_partition must be in 1..10" in capsys.readouterr().err
