"""Orchestration: config, CLI, models, data, train loop, evaluation, metrics and report."""
