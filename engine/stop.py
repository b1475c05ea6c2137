"""Clean stops: SIGINT or SIGTERM during training finishes the step, writes a full checkpoint and
exits 130 / 143 with the command that resumes; a second signal exits at once.

The handler only records the signal; the train loop asks `agreed()` after every step. On several
ranks the answer is agreed on (a max over a gloo group of CPU tensors: no device is touched), since
each rank may see the signal in a different step and a checkpoint is collective. A repeat within a
second counts as the same request: torchrun forwards a terminal's Ctrl-C to workers the terminal has
already signalled, so each gets it twice. A later one exits at once (`os._exit`): a checkpoint being
written then is left as a temporary folder, never renamed into place, so the last complete one stays.
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


class TrainingStopped(Exception):
    """Training stopped on a signal after `step`; `checkpoint` is the full checkpoint written then (or None)."""

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


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

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._at = signum, now
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a full checkpoint "
                  f"(signal again to exit at once)", file=sys.stderr, flush=True)
        elif now - self._at > _REPEAT_S:
            print(f"{signal.Signals(signum).name} again: exiting now; the last complete checkpoint is kept",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def agreed(self) -> int | None:
        """The signal to stop on, the same on every rank (None: carry on)."""
        if self.world == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return int(flag) or None
