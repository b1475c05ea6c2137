"""Timing a callable on a shared machine: the best of a few runs, by the clock the caller chooses.
The code is bench/step_measures.py's, which the peer worker (bench/peers.py) shares."""
from .step_measures import CLOCKS, best_time

__all__ = ["CLOCKS", "best_time"]
