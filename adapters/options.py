"""The strategies' options, their defaults and their ranges, in one place.

`AdapterConfig` is the `adapter` section of the engine's run config; the engine composes it and
never re-checks what `check()` checks. Checks that need the model (a depth, a block count) are
made where the model is known, in each strategy's `apply`. Both raise `AdapterError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kernels import MAX_RANK


class AdapterError(ValueError):
    """Options or a model a strategy cannot work with; the message says what and what to do."""


@dataclass
class AdapterConfig:
    top_k: int = 3                    # top_k: last K blocks train
    lora_rank: int = 8
    lora_alpha: float | None = None   # None = rank, i.e. scale alpha / rank = 1 (as in the paper's code)
    lora_targets: str = "q,v"         # any of q,k,v,proj,fc1,fc2
    lora_dropout: float = 0.0
    blocks: int = 3                   # block_expansion: P new blocks
    gate_threshold: float = 0.1       # selective_lora (TAPS defaults)
    gate_init: float = 0.15
    sparsity_lambda: float = 0.1      # the embedded default ends with 3 of 12 blocks active (README: the study)
    penalty_warmup: float = 0.1       # fraction of steps before the sparsity penalty starts
    active_blocks: int | None = None  # budget mode: exactly K LoRA blocks active at the end
    active_fraction: float | None = None  # budget mode: a fraction of the LoRA blocks
    search_fraction: float = 0.5      # budget mode: fraction of steps spent searching before the top-K are fixed

    def check(self) -> None:
        """Ranges every strategy relies on; AdapterError naming the option for the first one broken."""
        _positive_int("top_k must be", self.top_k)
        _positive_int("lora_rank must be", self.lora_rank)
        if self.lora_rank > MAX_RANK:
            raise AdapterError(f"lora_rank {self.lora_rank} is above {MAX_RANK}, the largest rank the fused "
                               f"kernels are compiled and checked for (kernels/_aot.py); choose {MAX_RANK} or less")
        _positive_int("block_expansion needs blocks (P) to be", self.blocks)
        if self.active_blocks is not None:
            _positive_int("active_blocks must be", self.active_blocks)
        _finite(self)
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise AdapterError(f"lora_alpha must be positive (scale = alpha / rank), got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.active_blocks is not None and self.active_fraction is not None:
            raise AdapterError("give active_blocks or active_fraction, not both")
        if self.active_fraction is not None and not 0 < self.active_fraction <= 1:
            raise AdapterError(f"active_fraction must be in (0, 1], got {self.active_fraction}")
        if self.budget_mode and not 0 < self.search_fraction < 1:
            raise AdapterError(f"search_fraction must be in (0, 1): the share of steps spent searching before "
                               f"the top-K gates are fixed, got {self.search_fraction}")
        if self.gate_init < self.gate_threshold:
            raise AdapterError(f"gate_init ({self.gate_init}) must be at least gate_threshold "
                               f"({self.gate_threshold}): a block that starts off has B = 0, so its score never "
                               f"gets a task gradient")
        if self.sparsity_lambda < 0:
            raise AdapterError(f"sparsity_lambda must be >= 0, got {self.sparsity_lambda}")
        if not 0 <= self.penalty_warmup <= 1:
            raise AdapterError(f"penalty_warmup is a fraction of the steps, in [0, 1], got {self.penalty_warmup}")

    @property
    def budget_mode(self) -> bool:
        """Selective LoRA with an exact number of active blocks (rather than TAPS' lambda alone)."""
        return self.active_blocks is not None or self.active_fraction is not None


def _positive_int(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"{what} a positive integer, got {value!r}")


def _finite(cfg: AdapterConfig) -> None:
    for name, value in vars(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise AdapterError(f"{name} must be a finite number, got {value}")
