"""Orchestration: config, CLI, models, data, train loop, evaluation, metrics and report."""
from .own_packages import pin as _pin_own_packages

_pin_own_packages()  # `kernels` and `adapters` are this project's from here on (engine/own_packages.py)
