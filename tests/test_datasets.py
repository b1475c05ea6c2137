"""Data set formats read into Domains: digits, CIFAR pickles, image folders."""
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

from engine.data import load_domain, stratified_split
from engine.errors import UserError


def test_digits_is_the_embedded_target():
    d = load_domain("embedded", role="target")
    assert d.name == "digits" and d.num_classes == 10
    assert len(d.train) + len(d.test) == 1797
    assert d.train.images.shape[1:] == (32, 32, 3) and d.train.images.dtype == np.uint8


def test_digits_are_scikit_learns_load_digits_read_without_importing_it(monkeypatch):
    from sklearn.datasets import load_digits

    from engine.data.datasets import digits_arrays
    bunch = load_digits()
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)  # put back after the test
    images, labels = digits_arrays()
    assert "sklearn" not in sys.modules
    assert np.array_equal(images, bunch.images) and images.dtype == bunch.images.dtype
    assert np.array_equal(labels, bunch.target) and labels.dtype == np.int64


def test_digits_fall_back_to_load_digits_where_the_shipped_file_is_not_found(monkeypatch):
    import importlib.util

    from sklearn.datasets import load_digits

    from engine.data.datasets import digits_arrays
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    images, labels = digits_arrays()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)


def test_stratified_split_holds_out_every_class():
    d = load_domain("digits")
    train, val = stratified_split(d.train, 0.1, seed=3)
    assert len(train) + len(val) == len(d.train)
    assert set(np.unique(val.labels)) == set(range(10))
    again, _ = stratified_split(d.train, 0.1, seed=3)
    assert np.array_equal(train.labels, again.labels)


def write_cifar100(root, n_train=12, n_test=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": rng.integers(0, 100, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(data, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return data


def test_cifar100_pickles_are_read_in_torchvision_layout(tmp_path):
    last = write_cifar100(tmp_path)
    d = load_domain("cifar100", tmp_path)
    assert d.num_classes == 100 and len(d.train) == 12 and len(d.test) == 5
    first = last[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(d.test.images[0], first)
    assert d.test.labels.tolist() == last[b"fine_labels"]


def test_missing_cifar_root_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_domain("cifar10", tmp_path)


def test_image_folder_with_train_and_val(tmp_path):
    for split in ("train", "val"):
        for c in ("b_cat", "a_dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(tmp_path / split / c / f"{i}.jpg")
    d = load_domain(f"imagefolder:{tmp_path}")
    assert d.classes == ["a_dog", "b_cat"] and len(d.train) == 6 and len(d.test) == 6
    assert d.train.paths[0].endswith("a_dog/0.jpg") and d.train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_unknown_data_set_and_missing_folder_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown data set"):
        load_domain("mnist")
    with pytest.raises(UserError, match="does not exist"):
        load_domain(f"imagefolder:{tmp_path / 'nope'}")
