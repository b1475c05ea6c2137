"""Timing a callable on a shared machine: the best of a few runs, by the clock the caller chooses."""
from __future__ import annotations

import time
from typing import Callable

import torch

from engine.metrics import sync

# wall: time.perf_counter; cpu: time.process_time, the process's CPU time, steadier than wall time on
# a shared, oversubscribed machine (with one thread; it does not see GPU time).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(fn: Callable, device: str, reps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of the fastest of `reps` calls of fn, after one untimed call (the least disturbed
    run: others' work only ever adds time)."""
    fn()
    sync(torch.device(device))
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        fn()
        sync(torch.device(device))
        best = min(best, clock() - t0)
    return best
