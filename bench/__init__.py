"""Measurement: per-strategy runs, kernel microbenchmarks, loader throughput."""
import engine  # noqa: F401  # first: `kernels` and `adapters` are this project's (engine/own_packages.py)
