"""Block Expansion (LLaMA Pro, Wu et al. 2024): identity copies of blocks, trained; the originals frozen.

The N blocks are split into P contiguous groups and a copy of each group's top block is inserted
directly after it. In each copy the weights and biases of `attn.proj` and `mlp.fc2` are zero, so both
residual branches add exactly 0 and the expanded model computes what the original did. Only the P
copies (all their parameters) and the new head train.

When P does not divide N, the groups are as even as possible and the first N mod P groups hold one
block more (numpy's array_split rule): N = 12, P = 5 -> groups of 3, 3, 2, 2, 2 -> copies after the
original blocks 2, 5, 7, 9, 11. The top block always gets a copy. (The paper's code copies after block
i when (i + 1) % (N // P) == 0, which inserts 6 copies for P = 5: not what was asked for.)

Positions are the original indices of the copied blocks; they are saved with the checkpoint and
`load_state` rebuilds the expansion from them. Frozen original blocks below the first copy see no
tensor that requires grad, so autograd records nothing there and keeps no activations for them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .base import Strategy, head_names, mark_trainable, names_under
from .options import AdapterError
from .registry import register


def group_tops(depth: int, groups: int) -> list[int]:
    """Original index of the top block of each of `groups` contiguous groups (larger groups first)."""
    if not 1 <= groups <= depth:
        raise AdapterError(f"blocks (P) must be between 1 and the model's depth {depth}, got {groups}")
    size, extra = divmod(depth, groups)
    tops, end = [], 0
    for g in range(groups):
        end += size + (1 if g < extra else 0)
        tops.append(end - 1)
    return tops


def identity_copy(block: nn.Module) -> nn.Module:
    """A deep copy of `block` whose attention output projection and MLP output layer are all zeros."""
    outputs = [getattr(getattr(block, a, None), b, None) for a, b in (("attn", "proj"), ("mlp", "fc2"))]
    if not all(isinstance(m, nn.Linear) for m in outputs):
        raise AdapterError(f"block_expansion needs timm ViT blocks with attn.proj and mlp.fc2 Linears; "
                         f"got a {type(block).__name__}")
    new = copy.deepcopy(block)
    with torch.no_grad():
        for linear in (new.attn.proj, new.mlp.fc2):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
    return new


def copy_indices(positions: list[int]) -> list[int]:
    """Where the copies sit in the expanded `blocks`: the j-th copy follows original block positions[j]."""
    return [p + j + 1 for j, p in enumerate(sorted(positions))]


def expand_blocks(model: nn.Module, positions: list[int]) -> list[nn.Module]:
    """Insert an identity copy after each original block in `positions`; return the copies."""
    blocks = list(model.blocks)
    if sorted(set(positions)) != sorted(positions) or not all(0 <= p < len(blocks) for p in positions):
        raise AdapterError(f"block positions {positions} must be distinct indices below the depth {len(blocks)}")
    expanded, copies = [], []
    for i, block in enumerate(blocks):
        expanded.append(block)
        if i in positions:
            copies.append(identity_copy(block))
            expanded.append(copies[-1])
    model.blocks = nn.Sequential(*expanded)
    _refresh_feature_info(model)
    return copies


def _refresh_feature_info(model: nn.Module) -> None:
    """timm lists one feature per block (features_only / forward_intermediates); keep it in step."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(f, dict) and "module" in f for f in info):
        model.feature_info = [dict(info[0], module=f"blocks.{i}") for i in range(len(model.blocks))]


@register
class BlockExpansion(Strategy):
    """P zero-initialised block copies train on top of the frozen original blocks."""

    name = "block_expansion"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.positions: list[int] = []
        self.depth: int | None = None  # the original depth N

    def insert(self, model):
        depth = len(model.blocks)
        self._expand(model, depth, group_tops(depth, self.cfg.blocks))

    def _expand(self, model, depth: int, positions: list[int]) -> None:
        expand_blocks(model, positions)
        self.depth, self.positions = depth, list(positions)

    def trainable_names(self, model):
        return names_under(model, *(f"blocks.{i}" for i in copy_indices(self.positions))) + head_names(model)

    def state(self):
        return {"positions": self.positions, "depth": self.depth}

    def load_state(self, model, state):
        """Rebuild the expansion from the saved positions if they differ from what `apply` chose."""
        positions, depth = [int(p) for p in state["positions"]], int(state.get("depth", self.depth))
        if depth != self.depth:
            raise AdapterError(f"the checkpoint expands a {depth}-block model; this model has {self.depth} blocks")
        if positions == self.positions:
            return
        copies = set(copy_indices(self.positions))
        model.blocks = nn.Sequential(*[b for i, b in enumerate(model.blocks) if i not in copies])
        self._expand(model, depth, positions)
        mark_trainable(model, self.trainable_names(model))
