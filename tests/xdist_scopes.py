"""How the suite is split over pytest-xdist's workers (tests/conftest.py's scheduler): a file's tests are
one unit of work, so its module fixtures run once; the files whose tests share a session fixture of
tests/conftest.py (the durability runs) are one unit together, so each of those runs once."""

SHARED_SESSION = {"test_resume.py", "test_multirank.py", "test_large_batch.py"}


def worker_scope(nodeid: str) -> str:
    """The unit of work a test goes to a worker in: its file, or 'shared-session' for SHARED_SESSION's."""
    file = nodeid.split("::", 1)[0]
    return "shared-session" if file.rsplit("/", 1)[-1] in SHARED_SESSION else file
