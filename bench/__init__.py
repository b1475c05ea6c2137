"""Measurement: per-strategy runs, kernel microbenchmarks, loader throughput."""
