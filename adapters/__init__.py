"""Fine-tuning strategies for timm ViTs, one module each, looked up by name."""
from . import full, linear, top_k  # noqa: F401  (registers the strategies)
from .base import Strategy, trainable_parameter_count
from .registry import STRATEGIES, get_strategy, register

__all__ = ["STRATEGIES", "Strategy", "get_strategy", "register", "trainable_parameter_count"]
