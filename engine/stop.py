"""Clean stops: SIGINT or SIGTERM in any phase of a run says where it stopped in one line and
exits 130 / 143, leaving a folder that `--resume` continues; a second signal exits at once.

During the train loop's steps (`StopRequest`) the handler only records the signal; the loop asks
`agreed()` after every step, finishes it and writes a full checkpoint. On several ranks the answer
is agreed on (a max over a gloo group of CPU tensors: no device is touched), since each rank may see
the signal in a different step and a checkpoint is collective. Outside them (`Phases`: reading the
data, the source k-NN, the final measurement, ...) the signal raises `RunStopped` where the run is,
naming its phase: what was unfinished there is done again on resume, and every file is written
atomically. A repeat within a second counts as the same request: torchrun forwards a terminal's
Ctrl-C to workers the terminal has already signalled, so each gets it twice. A later one exits at
once (`os._exit`): a checkpoint being written then is left as a temporary folder, never renamed into
place, so the last complete one stays.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_REPEAT_S = 1.0


class Stopped(BaseException):
    """A run stopped by signal `signum` `where` (a phrase: "after step 4", "during the ..."); exit 128 + signum.
    A BaseException, as KeyboardInterrupt is: raised wherever the signal lands, it must pass through
    every `except Exception` on the way (a cache read falling back to recomputing, a damaged image
    skipped), which would otherwise swallow it and let the run go on to its end."""

    def __init__(self, signum: int, where: str) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TrainingStopped(Stopped):
    """Training stopped on a signal after `step`; `checkpoint` is the full checkpoint written then (or None)."""

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        self.step, self.checkpoint = step, checkpoint
        super().__init__(signum, f"after step {step}")


class RunStopped(Stopped):
    """A signal outside the train loop's steps, raised where the run was: `phase` says where (a phrase:
    "during the source k-NN ..."), `run_dir` the folder the run holds (None: none claimed yet)."""

    def __init__(self, signum: int, phase: str, run_dir) -> None:
        self.phase, self.run_dir = phase, run_dir
        super().__init__(signum, phase)


class Phases:
    """A context for the whole run: `now`, the phase it is in (set by the run), and SIGINT / SIGTERM
    turned into RunStopped there (the train loop's StopRequest takes the signals over during its steps)."""

    def __init__(self) -> None:
        self.now, self.run_dir = "while starting", None
        self.signum, self._at, self._previous = None, 0.0, {}

    def __enter__(self) -> "Phases":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
            raise RunStopped(signum, self.now, self.run_dir)
        _again(signum, self._at)


def _again(signum: int, first_at: float) -> None:
    """A signal after the first: the same request within `_REPEAT_S`, else exit at once."""
    if time.monotonic() - first_at > _REPEAT_S:
        print(f"{signal.Signals(signum).name} again: exiting now; the last complete checkpoint is kept",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)


class StopRequest:
    """A context that turns SIGINT / SIGTERM into a request the train loop honours between steps."""

    def __init__(self, world: int) -> None:
        self.world, self.signum, self._at = world, None, 0.0
        self._previous = {}
        self._group = None
        if world > 1:  # collective: every rank builds its StopRequest at the same point
            gloo = torch.distributed.get_backend() == "gloo"
            self._group = None if gloo else torch.distributed.new_group(backend="gloo")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
            outer = getattr(handler, "__self__", None)
            if isinstance(outer, Phases) and self.signum is not None and outer.signum is None:
                outer.signum, outer._at = self.signum, self._at  # a repeat after the loop is still a repeat

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a full checkpoint "
                  f"(signal again to exit at once)", file=sys.stderr, flush=True)
        else:
            _again(signum, self._at)

    def agreed(self) -> int | None:
        """The signal to stop on, the same on every rank (None: carry on)."""
        if self.world == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(flag) or None
