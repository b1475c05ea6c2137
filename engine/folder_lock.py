"""One live owner per folder: a run folder or a sweep folder belongs to the process that holds its
lock, for as long as that process lives.

The lock is `flock` on FOLDER/.lock, exclusive and never waited for, on a descriptor kept open until
the owner releases it or dies: the operating system drops it with its process, so a kill -9, an OOM
kill or a lost node leaves nothing stale to clean up (the file stays, naming its last holder: a lock
file is not a lock). The holder writes its pid, host and start time into the file for the refusal
message, which takes them as a hint only: a holder that has not written yet, or text that is not
ours, reads as "another process". Locks are between processes: one process takes a folder once.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".lock"
# A taker that finds the lock held looks again a few times: a probe (`holder`) holds it for an
# instant, and must not make a taker refuse.
_TRIES, _PAUSE_S = 4, 0.05
# A holder that has died may leave the lock with a child it forked (a data loader's worker) for a few
# seconds, until the child sees its parent gone: a taker waits this long for such a lock to free.
_ORPHAN_WAIT_S = 15.0


class FolderBusy(UserError):
    """The folder is held by another live process; the message names it."""


class FolderLock:
    """The held lock of one folder (`take`); `release` (or the end of the process) gives it up."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder, self._fd = folder, fd

    @classmethod
    def take(cls, folder: str | Path, what: str) -> "FolderLock":
        """Hold `folder` (a folder that exists) for this process. FolderBusy, naming the holder, when
        another process holds it; `what` names the folder in messages ("run folder", "sweep folder")."""
        folder = Path(folder)
        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"{what} {folder}: cannot open its lock file {path} ({e.strerror or e})") from None
        try:
            if not _lock(fd) and not (_holder_gone(path) and _lock(fd, _ORPHAN_WAIT_S)):
                raise FolderBusy(f"{what} {folder} is in use by {holder_line(path)}: wait for it to end, or "
                                 f"stop it first")
            if not _same_file(fd, path):  # renamed aside (--overwrite elsewhere) between open and lock
                raise FolderBusy(f"{what} {folder} was replaced by another process while this one claimed it")
            stamp = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "by": _program()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(stamp) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(folder, fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # also held by any child forked since (a loader's workers)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(folder: str | Path) -> str | None:
    """Who holds `folder` now ("engine.run (pid 12 on node3, since ...)"), or None when no live process
    does. A look, not a claim: the answer may be out of date the moment it is given."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: never held (or not a folder)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # dropped again as the descriptor closes
    except BlockingIOError:
        return holder_line(path)
    finally:
        os.close(fd)
    return None


def holder_line(path: Path) -> str:
    """What the lock file at `path` says of its holder, on one line; it may be stale or not ours."""
    try:
        stamp = json.loads(path.read_text(errors="replace")[:4096])
        fields = {k: " ".join(str(stamp[k]).split())[:120] for k in ("pid", "host", "since", "by")}
    except (OSError, ValueError, TypeError, KeyError):
        return "another process (its lock file does not say which)"
    return f"{fields['by']} (pid {fields['pid']} on {fields['host']}, since {fields['since']})"


def _lock(fd: int, wait_s: float = _TRIES * _PAUSE_S) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_PAUSE_S)


def _holder_gone(path: Path) -> bool:
    """The lock file names a process of this host that no longer exists: what holds the lock now is a
    child it forked (a loader's worker) that has not yet seen its parent die."""
    try:
        stamp = json.loads(path.read_text(errors="replace")[:4096])
        pid, host = int(stamp["pid"]), str(stamp["host"])
    except (OSError, ValueError, TypeError, KeyError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _program() -> str:
    """`engine.run`, `engine.sweep`, ...: the module this process runs (its script's name otherwise)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    script = sys.argv[0] if sys.argv else ""
    return Path(script).name if script and script != "-c" else "python"
