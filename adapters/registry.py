"""Strategy names -> classes. A module registers its class with `@register` at import; this dict is
the one list of strategy names (the CLI's help and choices, the benches and the sweeps read it)."""
from __future__ import annotations

from .options import AdapterError

STRATEGIES: dict[str, type] = {}


def register(cls: type) -> type:
    if not cls.name or cls.name in STRATEGIES:
        raise RuntimeError(f"strategy name {cls.name!r} is empty or taken")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str, cfg):
    """Instantiate the strategy `name` with an AdapterConfig; AdapterError naming the choices if unknown."""
    if name not in STRATEGIES:
        raise AdapterError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](cfg)
