"""Nested mappings as flat dotted keys (`{"train": {"lr": 0.1}}` -> `{"train.lr": 0.1}`): how config
keys and DeepSpeed keys are named, compared and reported."""
from __future__ import annotations


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
