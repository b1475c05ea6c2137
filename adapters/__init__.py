"""Fine-tuning strategies for timm ViTs, one module each, looked up by name."""
# Importing registers each strategy; this order is the order error messages list them in.
from . import full, linear, top_k, lora, block_expansion, selective_lora  # noqa: F401  # isort: skip
from .base import Strategy, trainable_parameter_count
from .checkpoint import load_adapter, save_adapter
from .lora import LoRALinear, merge_lora, unmerge_lora
from .registry import STRATEGIES, get_strategy, register
from .selective_lora import GatedLoRALinear

__all__ = ["STRATEGIES", "GatedLoRALinear", "LoRALinear", "Strategy", "get_strategy", "load_adapter",
           "merge_lora", "register", "save_adapter", "trainable_parameter_count", "unmerge_lora"]
