"""Fast paths for the engine: the fused LoRA linear and the backend switch (`--kernels`).

Importing this package is cheap and works without a GPU: it registers the torch.library ops and
their FLOP formulas (every backend module is imported with the backend table); the Triton kernels
are imported and compiled only when the 'triton' backend is first used.
"""
from .lora_linear import BACKENDS, MAX_RANK, get_backend, lora_linear, resolve_backend, set_backend

__all__ = ["BACKENDS", "MAX_RANK", "get_backend", "lora_linear", "resolve_backend", "set_backend"]
