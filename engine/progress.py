"""What a user sees while a run works: progress bars on stderr, drawn only on a terminal (a piped
log gets the plain lines alone: one per eval), and lines printed around them without breaking them.

An error must start on a fresh line and no bar may be redrawn after it: `close_bars` closes every
live bar (clearing its line) before the CLI prints the error.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, desc: str, total: int | None = None, leave: bool = False,
                 initial: int = 0, show: bool = True) -> tqdm:
    """A tqdm bar on stderr, or a silent pass-through where `show` is False (another rank, a caller
    that wants none) or stderr is not a terminal."""
    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, file=sys.stderr,
                disable=None if show else True)


def say(line: str) -> None:
    """Print a line on stdout above any live bar (which is redrawn below it)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()  # piped into a log, each line is there as it happens (and survives a kill)


def close_bars() -> None:
    """Close every live bar, so that what is printed next starts on a clean line and stays last."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
