"""Fixtures shared across test modules."""
import random
import signal

import pytest

from bench.processes import signal_tree, start, wait_for_row
from durability import DURABLE, EQUIVALENCE, run_here
from xdist_scopes import worker_scope




def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (pytest.ini's -n 2), a worker takes a whole test file, so its module fixtures run
    once; the files in xdist_scopes.SHARED_SESSION go to one worker together, so its session fixtures run once. A
    scheduler of our own: `--dist loadgroup`'s marks no longer group anything under pytest 9 (xdist 3.8
    appends the group to `item._nodeid`, which pytest 9's `nodeid` does not read), and each worker ran
    its share of every file's module fixtures."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    return ByFile(config, log)


@pytest.fixture(scope="session")
def durable_reference(tmp_path_factory):
    """The uninterrupted one-rank run that the durability and multi-rank tests compare with."""
    out = tmp_path_factory.mktemp("reference")
    assert run_here([*DURABLE, "--out", str(out), "--name", "one-rank"]) == 0
    return out / "one-rank"


@pytest.fixture(scope="session")
def two_rank_runs(tmp_path_factory):
    """One torchrun launch for every two-rank check (each launch costs a start of two processes): the
    durability run uninterrupted (ZeRO 2), the equivalence runs under ZeRO 0 and 3, ZeRO-3 with
    activation checkpointing (tests/zero3_checkpointing.py, read by tests/test_large_batch.py), then
    the durability run again, SIGKILLed with torchrun and both workers at a random step after its
    first full checkpoint. Returns the folder and that step."""
    runs = tmp_path_factory.mktemp("multirank")
    step = random.choice([3, 4, 5])
    job = ["two-ranks", *DURABLE, "--", "zero0", *EQUIVALENCE, "--zero-stage", "0",
           "--", "zero3", *EQUIVALENCE, "--zero-stage", "3", "--", "zero3-checkpointing",
           "--", "killed", *DURABLE]
    proc = start([str(runs), *job], ranks=2, log=runs / "two-ranks.log", module="tests.multirank_job")
    try:
        wait_for_row(proc, runs / "killed" / "metrics.csv", step)
    except BaseException:
        signal_tree(proc, signal.SIGKILL)  # a failed wait leaves no job running on behind the suite
        raise
    assert signal_tree(proc, signal.SIGKILL) == -signal.SIGKILL
    return runs, step
