"""Fixtures: small image folders in tmp_path (see data_fixtures for what they hold)."""
from pathlib import Path

import pytest

from data_fixtures import write_awkward_images, write_broken_files, write_good_folder


@pytest.fixture
def good_folder(tmp_path) -> Path:
    return write_good_folder(tmp_path / "good")


@pytest.fixture
def messy_folder(tmp_path) -> tuple[Path, dict, dict]:
    """Three classes: good JPEGs everywhere, awkward-but-readable images in one, broken files in another."""
    root = write_good_folder(tmp_path / "messy", per_class=3)
    awkward = write_awkward_images(root / "cat")
    broken = write_broken_files(root / "dog")
    return root, awkward, broken
