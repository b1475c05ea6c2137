"""Selective LoRA: LoRA blocks switched on and off by learned gates, then merged away for inference.

One LoRA block per targeted projection per transformer block ("3.q" is the q update of block 3), each
with a learnable score (TAPS, Wallingford et al. 2022). Forward uses the hard gate `score >= threshold`;
backward passes the gate's gradient straight through to the score; the loss adds
`lambda * mean|score|` once the warm-up is over, pushing the blocks that do not pay for themselves off.

Two ways to end training:
- TAPS mode (default): the gates stay live for the whole run; `finalize` keeps the blocks whose score is
  at or above the threshold. The number of active blocks is steered only through lambda.
- Budget mode (`active_blocks=K` or `active_fraction=F`, beyond the paper): gates are searched for the
  first `search_fraction` of the steps (the sparsity penalty applies there as in TAPS), then `on_step`
  fixes the K highest-scoring blocks on and the rest off (ties: the earlier block), and the remaining
  steps fine-tune only those K, with no penalty. Training ends with exactly K blocks active; `finalize`
  applies the same top-K rule to a checkpoint saved before the search ended.

Once gates are fixed, an inactive block is not passed to the fused op at all (the gated-block skip):
no forward or backward FLOPs, its A and B stop requiring grad; in budget mode each block's A and B,
and the scores, are their own `param_groups`, so the engine can stop its optimiser moving them. During the search, a block whose gate is
0 still costs the low-rank backward that computes its score's straight-through gradient.

`finalize` merges the active blocks into the frozen weights and drops the rest: the inference model is a
plain timm model with the base model's FLOPs, whatever the rank.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .base import head_names
from .lora import LoRA, LoRALinear, inject_lora, replace_with_linear
from .options import AdapterError
from .registry import register


class GatedLoRALinear(LoRALinear):
    """LoRALinear whose segments each carry a score (`lora_score.<seg>`, shape (1,)) and a hard gate.

    Scores are (1,) rather than 0-dim because DeepSpeed's initial broadcast views every parameter as
    bytes, which a 0-dim tensor cannot do; the gate handed to the fused op is the 0-dim view.
    """

    def __init__(self, base: nn.Linear, segments, rank, alpha, dropout=0.0, *, threshold: float,
                 score_init: float) -> None:
        super().__init__(base, segments, rank, alpha, dropout)
        self.threshold = threshold
        self.lora_score = nn.ParameterDict(
            [(n, nn.Parameter(torch.full((1,), float(score_init), device=base.weight.device))) for n in segments])
        self.fixed: dict[str, bool] | None = None  # None while searching; then segment -> on/off
        # The score tensors the last forward used: the sparsity penalty reads these, not the parameters,
        # because under ZeRO-3 a parameter is only materialised inside its module's forward.
        self.scores_in_forward: dict[str, torch.Tensor] = {}

    def is_active(self, name: str) -> bool:
        if self.fixed is not None:
            return self.fixed[name]
        return self.lora_score[name].item() >= self.threshold

    def _gate(self, name: str) -> torch.Tensor:
        """Hard indicator forward, identity backward (straight-through): value exactly 0. or 1."""
        score = self.lora_score[name].view(())  # (1,) -> 0-dim, still the parameter's graph
        self.scores_in_forward[name] = score
        hard = (score.detach() >= self.threshold).to(score.dtype)
        return hard + (score - score.detach())  # x - x is exactly 0, so the value stays a hard 0/1

    def _call_segments(self):
        if self.merged:
            return [], None
        if self.fixed is not None:  # the gated-block skip: inactive segments are not in the call
            return [n for n in self.segment_names if self.fixed[n]], None
        return self.segment_names, [self._gate(n) for n in self.segment_names]

    def _merge_names(self):
        return [n for n in self.segment_names if self.is_active(n)]

    def fix(self, active: set[str]) -> None:
        """Freeze the gates: `active` segments stay on and train, the others are skipped and frozen."""
        if self.merged:
            raise RuntimeError("cannot change the gates of a merged LoRA module; unmerge it first")
        self.fixed = {n: n in active for n in self.segment_names}
        for n in self.segment_names:
            self.lora_score[n].requires_grad_(False)
            if not self.fixed[n]:
                self.lora_a[n].requires_grad_(False)
                self.lora_b[n].requires_grad_(False)


def _gate_name(path: str, segment: str) -> str:
    """'blocks.3.attn.qkv', 'q' -> '3.q': one LoRA block, as named in state() and results."""
    return f"{path.split('.')[1]}.{segment}"


def budget_size(cfg, total_blocks: int) -> int | None:
    """K for budget mode (active_fraction F -> round(F * total), at least 1); None in TAPS mode."""
    if cfg.active_blocks is not None:
        return cfg.active_blocks
    if cfg.active_fraction is not None:
        return max(1, math.floor(cfg.active_fraction * total_blocks + 0.5))
    return None


@register
class SelectiveLoRA(LoRA):
    """TAPS-gated LoRA with an optional exact budget of active blocks; see the module docstring."""

    name = "selective_lora"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self._modules: dict[str, GatedLoRALinear] = {}  # "blocks.3.attn.qkv" -> module
        self._gates: dict[str, tuple[GatedLoRALinear, str]] = {}  # "3.q" -> (module, segment)

    @property
    def budget_mode(self) -> bool:
        return self.cfg.budget_mode

    @property
    def fixed(self) -> bool:
        """Whether the gates are fixed; the modules hold that state (`GatedLoRALinear.fixed`)."""
        return any(m.fixed is not None for m in self._modules.values())

    def insert(self, model):
        """LoRA's insert, with gated modules; gates are named '<block>.<target>' in block, then target order."""
        self._modules = inject_lora(model, self.targets, self.rank, self.alpha, self.dropout,
                                    module_cls=GatedLoRALinear, threshold=self.cfg.gate_threshold,
                                    score_init=self.cfg.gate_init)
        self._gates = {_gate_name(path, seg): (m, seg) for path, m in self._modules.items() for seg in m.segment_names}
        k = budget_size(self.cfg, len(self._gates))
        if k is not None and k > len(self._gates):
            raise AdapterError(f"active_blocks {k} exceeds the {len(self._gates)} LoRA blocks of this model "
                               f"({len(model.blocks)} blocks x targets {','.join(self.targets)})")

    def trainable_names(self, model):
        """The head, and per LoRA block: its score while the gates are searched; A and B unless its
        gate is fixed off (what `GatedLoRALinear.fix` leaves requiring grad)."""
        paths = {m: path for path, m in self._modules.items()}
        names = []
        for m, path in paths.items():
            for seg in m.segment_names:
                if m.fixed is None or m.fixed[seg]:
                    names += [f"{path}.lora_a.{seg}", f"{path}.lora_b.{seg}"]
                if m.fixed is None:
                    names.append(f"{path}.lora_score.{seg}")
        order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        return sorted(names, key=order.__getitem__) + head_names(model)

    def param_groups(self, model):
        """Budget mode: the scores (all fixed together), each LoRA block's A and B (fixed on or off),
        and the head; TAPS mode never freezes anything mid-run: one group."""
        if not self.budget_mode:
            return super().param_groups(model)
        paths = {m: path for path, m in self._modules.items()}
        scores = [f"{paths[m]}.lora_score.{seg}" for m, seg in self._gates.values()]
        blocks = [[f"{paths[m]}.lora_a.{seg}", f"{paths[m]}.lora_b.{seg}"] for m, seg in self._gates.values()]
        grouped = set(scores).union(*blocks)
        return [scores, *blocks, [n for n in self.trainable_names(model) if n not in grouped]]

    # -- gates ------------------------------------------------------------------------------------------
    def _scores(self) -> dict[str, float]:
        return {name: m.lora_score[seg].item() for name, (m, seg) in self._gates.items()}

    def _active(self) -> list[str]:
        return [name for name, (m, seg) in self._gates.items() if m.is_active(seg)]

    def top_k(self, k: int) -> set[str]:
        """The k highest-scoring blocks; ties go to the earlier block (deterministic)."""
        scores = self._scores()
        return set(sorted(scores, key=lambda name: -scores[name])[:k])  # sorted is stable

    def fix_gates(self, active: set[str]) -> None:
        unknown = sorted(set(active) - set(self._gates))
        if unknown:
            raise AdapterError(f"unknown LoRA blocks {unknown[:3]}; this model has {len(self._gates)}, "
                             f"e.g. {next(iter(self._gates), None)}")
        for path, m in self._modules.items():
            m.fix({seg for seg in m.segment_names if _gate_name(path, seg) in active})

    def _final_selection(self) -> set[str]:
        k = budget_size(self.cfg, len(self._gates))
        return self.top_k(k) if k is not None else set(self._active())

    def search_steps(self, total_steps: int) -> int:
        return max(1, round(self.cfg.search_fraction * total_steps))

    # -- the protocol -------------------------------------------------------------------------------------
    def extra_loss(self, model, step, total_steps):
        """lambda * mean|score| over all blocks, off during the warm-up and once the gates are fixed."""
        if self.fixed or self.cfg.sparsity_lambda == 0 or step < self.cfg.penalty_warmup * total_steps:
            return None
        scores = torch.stack([m.scores_in_forward[seg] if seg in m.scores_in_forward else m.lora_score[seg].view(())
                              for m, seg in self._gates.values()])
        return self.cfg.sparsity_lambda * scores.abs().mean()

    def on_step(self, model, step, total_steps, gather=contextlib.nullcontext):
        if self.budget_mode and not self.fixed and step >= self.search_steps(total_steps):
            with gather():  # the final selection reads the gate scores
                self.fix_gates(self._final_selection())

    def selectable(self, step, total_steps):
        """In budget mode only checkpoints with the final K gates fixed (and fine-tuned) compete for best."""
        return not self.budget_mode or self.fixed

    def finalize(self, model):
        if not self.fixed:
            self.fix_gates(self._final_selection())
        return replace_with_linear(model)

    def state(self):
        return {**super().state(), "threshold": self.cfg.gate_threshold, "total_blocks": len(self._gates),
                "fixed": self.fixed, "active": self._active(), "scores": self._scores()}

    def load_state(self, model, state):
        scores = state.get("scores", {})
        unknown = sorted(set(scores) - set(self._gates))
        if unknown:
            raise AdapterError(f"saved gates {unknown[:3]} do not exist on this model ({len(self._gates)} LoRA blocks)")
        with torch.no_grad():
            for name, value in scores.items():
                m, seg = self._gates[name]
                m.lora_score[seg].fill_(value)
        if state.get("fixed"):
            self.fix_gates(set(state["active"]))

    def metrics(self, model):
        return {"active_blocks": len(self._active()), "total_blocks": len(self._gates)}
