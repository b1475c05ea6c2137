"""Fixtures shared across test modules."""
import pytest

from durability import DURABLE, run_here


@pytest.fixture(scope="session")
def durable_reference(tmp_path_factory):
    """The uninterrupted one-rank run that the durability and multi-rank tests compare with."""
    out = tmp_path_factory.mktemp("reference")
    assert run_here([*DURABLE, "--out", str(out), "--name", "one-rank"]) == 0
    return out / "one-rank"
