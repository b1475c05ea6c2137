"""LoRA (Hu et al., 2021) on a timm ViT: frozen weights, trainable low-rank updates W' = W + s * B A.

timm fuses q, k and v into one Linear, `blocks[i].attn.qkv`, whose output columns are [q | k | v].
LoRA on "q and v" is therefore not one LoRA on qkv but two low-rank updates that write only the first
and the last third of its output; the k third is never touched. Worked example, ViT-B (D = 768), r = 8:

    qkv.weight (2304, 768) frozen
    lora_a.q (8, 768), lora_b.q (768, 8)  -> columns [0, 768)
    lora_a.v (8, 768), lora_b.v (768, 8)  -> columns [1536, 2304)
    2 x (8 x 768 + 768 x 8) = 24,576 trainable per block, 294,912 for 12 blocks (+ the head)

`LoRALinear` replaces the Linear in place and keeps its `weight` and `bias` under the same names, so a
merged model's state dict is a plain timm state dict. All the math goes through `kernels.lora_linear`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels import BACKENDS, lora_linear

from .base import Strategy, head_names
from .options import AdapterError
from .registry import register

TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")
_QKV = ("q", "k", "v")
_MODULE_OF = {"q": "attn.qkv", "k": "attn.qkv", "v": "attn.qkv",
              "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def parse_targets(spec: str | list | tuple) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v') in canonical order; ValueError naming the choices for anything else."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(t).strip() for t in items if str(t).strip()]
    if not names:
        raise AdapterError(f"lora_targets is empty; give a comma-separated subset of {','.join(TARGETS)}, e.g. q,v")
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise AdapterError(f"unknown lora target {unknown[0]!r} in {spec!r}; choose from {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in names)


class LoRALinear(nn.Module):
    """A frozen Linear plus named low-rank segments, each writing a column range of the output.

    Keeps the wrapped Linear's `weight` and `bias` Parameters (same objects, same state-dict names) and
    adds `lora_a.<seg>` (r, in) and `lora_b.<seg>` (width, r). `segments` maps a name to (start, width).
    """

    def __init__(self, base: nn.Linear, segments: dict[str, tuple[int, int]], rank: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = dropout
        self.starts = {name: start for name, (start, _) in segments.items()}
        dd = dict(device=base.weight.device, dtype=base.weight.dtype)
        # (name, parameter) pairs, not a dict: ParameterDict sorts a plain dict's keys (k before q).
        self.lora_a = nn.ParameterDict(
            [(n, nn.Parameter(torch.empty(rank, self.in_features, **dd))) for n in segments])  # (r, in)
        self.lora_b = nn.ParameterDict(
            [(n, nn.Parameter(torch.zeros(w, rank, **dd))) for n, (_, w) in segments.items()])  # (width, r)
        for a in self.lora_a.values():
            # As nn.Linear and the paper's code: Kaiming-uniform A, zero B, so the update starts at 0.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.merged = False
        self.backend: str | None = None  # kernels backend; None = kernels' process-wide default

    @property
    def segment_names(self) -> list[str]:
        return list(self.lora_a.keys())

    def _call_segments(self) -> tuple[list[str], list | None]:
        """The segments this call computes and their gates (None: all on). Gated subclasses override."""
        return ([] if self.merged else self.segment_names), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        names, gates = self._call_segments()
        a = [self.lora_a[n] for n in names]
        b = [self.lora_b[n] for n in names]
        starts = [self.starts[n] for n in names]
        if names and self.training and self.dropout > 0:
            # The op takes one input; dropout must reach only the low-rank path, so the op runs on
            # dropout(x) and the base output's difference comes in as the residual (one extra GEMM).
            x_drop = nn.functional.dropout(x, self.dropout, training=True)
            residual = nn.functional.linear(x - x_drop, self.weight.detach())
            return lora_linear(x_drop, self.weight, self.bias, a, b, starts, self.scale, gates=gates,
                               residual=residual, backend=self.backend)
        return lora_linear(x, self.weight, self.bias, a, b, starts, self.scale, gates=gates, backend=self.backend)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B A for one segment, (width, in): what merging adds to its rows of the weight."""
        return (self.lora_b[name] @ self.lora_a[name]) * self.scale

    def _merge_names(self) -> list[str]:
        return self.segment_names

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the updates into `weight` (forward then costs a plain Linear); undo with `unmerge`."""
        if not self.merged:
            self._add_deltas(+1)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_deltas(-1)
            self.merged = False

    def _add_deltas(self, sign: int) -> None:
        for name in self._merge_names():
            delta = self.delta_weight(name)
            start = self.starts[name]
            self.weight[start:start + delta.shape[0]] += sign * delta

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the updates merged: the inference form, no LoRA parameters left."""
        self.merge()
        # Built on the meta device (no allocation), then handed the merged Parameters.
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        segs = ", ".join(f"{n}@{self.starts[n]}" for n in self.segment_names)
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}, "
                f"segments=[{segs}]")


def _set(module: nn.Module, path: str, child: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(parent), leaf, child)  # get_submodule("") is the module itself


def _segments_for(targets: tuple[str, ...], path: str, linear: nn.Linear) -> dict[str, tuple[int, int]]:
    """Column ranges of `linear`'s output that each target writes: thirds of qkv, all of the others."""
    if path == "attn.qkv":
        third = linear.out_features // 3
        return {t: (_QKV.index(t) * third, third) for t in targets if t in _QKV}
    (target,) = [t for t in targets if _MODULE_OF[t] == path]
    return {target: (0, linear.out_features)}


def inject_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, dropout: float = 0.0,
                module_cls=LoRALinear, **module_kwargs) -> dict[str, LoRALinear]:
    """Replace the targeted Linears of every block by `module_cls`; return them by path (blocks.3.attn.qkv)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise AdapterError(f"LoRA needs a timm VisionTransformer with `blocks`; got {type(model).__name__}")
    paths = list(dict.fromkeys(_MODULE_OF[t] for t in targets))  # qkv once for any of q, k, v
    wrapped = {}
    for i, block in enumerate(blocks):
        for path in paths:
            linear = block.get_submodule(path)
            if not isinstance(linear, nn.Linear):
                raise AdapterError(f"blocks.{i}.{path} is a {type(linear).__name__}, not a Linear; LoRA supports "
                                 f"timm VisionTransformer blocks")
            module = module_cls(linear, _segments_for(targets, path, linear), rank, alpha, dropout, **module_kwargs)
            _set(block, path, module)
            wrapped[f"blocks.{i}.{path}"] = module
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def use_kernels(model: nn.Module, backend: str) -> nn.Module:
    """Run every LoRA module of `model` on the kernels backend `backend` (a runtime choice, not
    part of the adapter: the engine applies it wherever it builds or restores a model)."""
    if backend not in BACKENDS:
        raise AdapterError(f"unknown kernels backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    for m in lora_modules(model).values():
        m.backend = backend
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its frozen weight (reversible with `unmerge_lora`)."""
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def replace_with_linear(model: nn.Module) -> nn.Module:
    """Merge and swap each LoRALinear for a plain nn.Linear: a timm model again, base FLOPs."""
    for name, m in lora_modules(model).items():
        _set(model, name, m.to_linear())
    return model


def check_lora_options(cfg) -> tuple[tuple[str, ...], int, float, float]:
    """The LoRA options as (targets, rank, alpha, dropout); `cfg.check()` has checked their ranges."""
    alpha = float(cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha)
    return parse_targets(cfg.lora_targets), cfg.lora_rank, alpha, float(cfg.lora_dropout)


@register
class LoRA(Strategy):
    """LoRA on the targeted projections of every block (q and v by default) plus the new head."""

    name = "lora"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.targets, self.rank, self.alpha, self.dropout = check_lora_options(cfg)

    def insert(self, model):
        inject_lora(model, self.targets, self.rank, self.alpha, self.dropout)

    def trainable_names(self, model):
        return [name for name, _ in model.named_parameters() if ".lora_a." in name or ".lora_b." in name] \
            + head_names(model)

    def finalize(self, model):
        return replace_with_linear(model)

    def state(self):
        return {"targets": list(self.targets), "rank": self.rank, "alpha": self.alpha}
