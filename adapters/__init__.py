"""Fine-tuning strategies for timm ViTs, one module each, looked up by name."""
# Importing registers each strategy; this order is the order error messages list them in.
from . import full, linear, top_k, lora, block_expansion, selective_lora  # noqa: F401  # isort: skip
from .base import Strategy, trainable_parameter_count
from .lora import LoRALinear, merge_lora, unmerge_lora, use_kernels
from .options import AdapterConfig, AdapterError
from .registry import STRATEGIES, get_strategy, register
from .selective_lora import GatedLoRALinear

__all__ = ["STRATEGIES", "AdapterConfig", "AdapterError", "GatedLoRALinear", "LoRALinear", "Strategy",
           "get_strategy", "merge_lora", "register", "trainable_parameter_count", "unmerge_lora", "use_kernels"]
