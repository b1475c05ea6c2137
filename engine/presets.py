"""Sweep presets: the paper's table (`paper`), its Figure 2 (`paper-transfer`: four strategies on five
transfer sets) and Figure 4 (`paper-vits`: DINO ViT-S/16), the table's rows on the embedded default
(`embedded`), selective LoRA's own curve (`selective`), the selective LoRA paper's CLIP setting
(`clip`: zero-shot retention and shift, with WiSE-FT as a row derived by `engine.interpolate`,
`Row.interpolate`), and sequences of embedded domains (`continual`: each row an
`engine.sequence`, its average accuracy and forgetting in the table).

A preset is rows (a label, the table group, a strategy from `adapters.STRATEGIES` and its options as
`engine.run` arguments), learning rates, and the arguments every run gets. `engine.sweep` turns
rows x learning rates x seeds into runs and picks each row's learning rate by validation accuracy.

The paper is Bafghi et al. 2024, Table 1 (DINO ViT-B/16, CIFAR-100 target, ImageNet-1K 20-NN source),
with the recipe of its code: SGD momentum 0.9, no weight decay, batch 128, 10,000 steps, warm-up 500
then cosine, validation every 500, random-resized crop + flip, LRs 0.05 / 0.01 / 0.005 (the linear
probe 0.5 / 0.05 / 0.005). That recipe lives in `configs/paper_cifar100.yaml`, which every run of the
`paper` preset reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import adapters

from .errors import UserError

GROUPS = ("Standard", "LoRA", "Block Expansion", "Selective LoRA")  # the table's sections, in order
PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper_cifar100.yaml"
PAPER_LRS = (0.05, 0.01, 0.005)
LINEAR_LRS = (0.5, 0.05, 0.005)  # the paper's code probes linearly with larger rates
# The forgetting curve of the paper presets: every step of the first ten (the abstract: over 70% lost
# "after just 10 iterations"), then the default log-spaced steps (engine.curve.parse_steps).
PAPER_CURVE_STEPS = "0-10,log"


@dataclass(frozen=True)
class PaperFigures:
    """A row of the paper's Table 1 as printed (its LoRA counts include the head twice); None where the
    paper prints no figure (its Figure 4 gives only full fine-tuning's source k-NN)."""
    trainable: str
    target: float | None
    source: float | None
    mean: float | None


@dataclass(frozen=True)
class SequenceOf:
    """A row that is a sequence (`engine.sequence`): its targets in training order, its adapters kept one way."""
    targets: tuple[str, ...]
    adapters: str = "merge"           # merge or swap (engine.sequence.ADAPTER_MODES)


@dataclass(frozen=True)
class InterpolationOf:
    """A row derived from another row's runs by weight interpolation (`engine.interpolate`, WiSE-FT):
    theta(alpha) of the run of row `source` at each learning rate and seed."""
    source: str                       # the key of the row it derives from (a single-run row of the preset)
    alpha: float


@dataclass(frozen=True)
class Row:
    """One row of the table: a strategy with its options, trained at each of `lrs` (None: the preset's);
    with `sequence`, each of its runs is a sequence of targets instead of one run; with `interpolate`,
    each of its points is `engine.interpolate` of the source row's run at the same learning rate and seed
    (its strategy that row's), nothing trained. `paper_zeroshot`: the selective LoRA paper's zero-shot
    forgetting figure for this row as printed (PAPER_ZEROSHOT_SOURCE), shown beside ours."""
    key: str                          # run-name stem, e.g. lora-r8
    label: str                        # as the table prints it, e.g. LoRA r=8
    group: str                        # one of GROUPS
    strategy: str                     # a name in adapters.STRATEGIES
    args: tuple[str, ...] = ()        # engine.run flags or key=value for this row
    lrs: tuple[float, ...] | None = None
    paper: PaperFigures | None = None
    sequence: SequenceOf | None = None
    interpolate: InterpolationOf | None = None
    paper_zeroshot: str | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    rows: tuple[Row, ...]
    lrs: tuple[float, ...]
    base_args: tuple[str, ...] = ()   # every run's engine.run arguments, before the row's and the user's
    quick_rows: tuple[str, ...] = ()  # `--quick`: these rows' keys (the six strategies at their defaults) ...
    quick_lr: float | None = None     # ... at this one learning rate
    needs_source: bool = False        # the user must name the source domain (ImageNet lives in a folder)
    note: str = ""                    # printed under the table
    paper_figures_from: str = "Table 1"  # where the rows' `paper` figures are printed in the paper

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)


def _rows(paper: bool, full_lrs: tuple[float, ...] | None = None) -> tuple[Row, ...]:
    """The paper's rows (All, Top-3, Linear, LoRA r 4/8/16, Block Expansion p 1..4), then selective LoRA
    in TAPS mode and with budgets of 5, 10 and 25% of the LoRA blocks."""
    def fig(trainable, target, source, mean):
        return PaperFigures(trainable, target, source, mean) if paper else None

    rows = [
        Row("full", "All", "Standard", "full", paper=fig("85.9 M", 88.13, 25.24, 56.69)),
        Row("top3", "Top-3", "Standard", "top_k", ("--top-k", "3"), paper=fig("21.3 M", 84.56, 74.15, 79.36)),
        Row("linear", "Linear", "Standard", "linear", lrs=LINEAR_LRS, paper=fig("76.9 K", 80.57, 76.11, 78.34)),
        Row("lora-r4", "LoRA r=4", "LoRA", "lora", ("--lora-rank", "4"), paper=fig("301 K", 87.91, 66.82, 77.37)),
        Row("lora-r8", "LoRA r=8", "LoRA", "lora", ("--lora-rank", "8"), paper=fig("448 K", 88.27, 65.99, 77.13)),
        Row("lora-r16", "LoRA r=16", "LoRA", "lora", ("--lora-rank", "16"), paper=fig("743 K", 87.84, 65.06, 76.45)),
        Row("blockexp-p1", "Block Exp. p=1", "Block Expansion", "block_expansion", ("--blocks", "1"),
            paper=fig("7.2 M", 82.72, 75.75, 79.24)),
        Row("blockexp-p2", "Block Exp. p=2", "Block Expansion", "block_expansion", ("--blocks", "2"),
            paper=fig("14.3 M", 86.70, 75.54, 81.12)),
        Row("blockexp-p3", "Block Exp. p=3", "Block Expansion", "block_expansion", ("--blocks", "3"),
            paper=fig("21.3 M", 88.58, 74.61, 81.60)),
        Row("blockexp-p4", "Block Exp. p=4", "Block Expansion", "block_expansion", ("--blocks", "4"),
            paper=fig("28.4 M", 89.09, 72.28, 80.69)),
        Row("selective-taps", "Selective LoRA (TAPS)", "Selective LoRA", "selective_lora"),
        Row("selective-5pct", "Selective LoRA 5%", "Selective LoRA", "selective_lora", ("--active-fraction", "0.05")),
        Row("selective-10pct", "Selective LoRA 10%", "Selective LoRA", "selective_lora", ("--active-fraction", "0.1")),
        Row("selective-25pct", "Selective LoRA 25%", "Selective LoRA", "selective_lora", ("--active-fraction", "0.25")),
    ]
    # Layer-wise LR decay 0.65 for All, as BEiT-style fine-tuning does: a forgetting baseline (lower blocks barely move).
    rows.insert(1, Row("full-ld065", "All, layer decay 0.65", "Standard", "full", ("train.layer_decay=0.65",)))
    return tuple(rows)


_QUICK = ("full", "top3", "linear", "lora-r8", "blockexp-p3", "selective-taps")  # each strategy at its defaults

# Every paper preset's runs: the paper's recipe, a large curve subset, and the first ten steps one by one.
_PAPER_ARGS = ("--config", str(PAPER_CONFIG), "eval.knn_curve_limit=10000", f"eval.knn_steps={PAPER_CURVE_STEPS}")

PAPER = Preset(
    name="paper",
    description="the paper's Table 1: DINO ViT-B/16, CIFAR-100 target, ImageNet-1K k-NN source (needs the data, "
                "GPUs and data.source=imagefolder:DIR)",
    rows=_rows(paper=True), lrs=PAPER_LRS,
    base_args=_PAPER_ARGS,
    quick_rows=_QUICK, quick_lr=0.01, needs_source=True,
    note="The paper's LoRA parameter counts (301 K, 448 K, 743 K) include the 76.9 K classifier twice; ours "
         "count it once. The paper selected checkpoints on the test set; we select on a validation split "
         "held out of CIFAR-100's train set.")

EMBEDDED = Preset(
    name="embedded",
    description="the paper's rows on the embedded default (offline, CPU)",
    rows=_rows(paper=False), lrs=PAPER_LRS, quick_rows=_QUICK, quick_lr=0.05)

# Selective LoRA's own curve on the embedded default: TAPS' sparsity lambda, and the budget, swept at the
# default learning rate; plain LoRA r=8 (the embedded preset's row) is the reference. Its runs have the
# embedded preset's arguments (forgetting curve included), so both can share one folder
# (`--out runs/sweep-embedded`) and the LoRA run is not redone.
_LAMBDAS = ("0.05", "0.075", "0.1", "0.125", "0.15")  # measured: 0.05 keeps 11 of 12 blocks, 0.15 none
_FRACTIONS = ("0.05", "0.17", "0.25", "0.5", "0.75", "1")
SELECTIVE = Preset(
    name="selective",
    description="selective LoRA's active fraction against target accuracy and forgetting (embedded default)",
    rows=(EMBEDDED.row("lora-r8"),
          *(Row(f"taps-l{v}", f"TAPS lambda={v}", "Selective LoRA", "selective_lora", ("--sparsity-lambda", v))
            for v in _LAMBDAS),
          *(Row(f"budget-{v}", f"budget {float(v):.0%}", "Selective LoRA", "selective_lora",
                ("--active-fraction", v)) for v in _FRACTIONS)),
    lrs=(0.05,))

# The paper's Figure 2: its four main strategies on each of its five transfer sets (the table's groups are the
# data sets, in the figure's order), at its learning rates; and its Figure 4: the same rows with DINO ViT-S/16.
TRANSFER_SETS = (("dtd", "DTD"), ("flowers102", "Flowers102"), ("food101", "Food101"), ("cifar10", "CIFAR-10"),
                 ("cifar100", "CIFAR-100"))
_FIGURE_ROWS = ("full", "linear", "lora-r8", "blockexp-p3")  # All, Linear, LoRA r=8, Block Exp. p=3


def _figure_rows(target: str, group: str, paper: dict[str, PaperFigures] | None = None) -> tuple[Row, ...]:
    """The four strategies of the paper's figures on one target, without Table 1's figures; `paper`:
    the figures the paper prints for some of them, by row key."""
    return tuple(Row(f"{target}-{row.key}", row.label, group, row.strategy, (*row.args, "--target", target), row.lrs,
                     paper=(paper or {}).get(row.key))
                 for row in (EMBEDDED.row(k) for k in _FIGURE_ROWS))


PAPER_TRANSFER = Preset(
    name="paper-transfer",
    description="the paper's Figure 2: All, Linear, LoRA r=8 and Block Exp. p=3 on DTD, Flowers102, Food101, "
                "CIFAR-10 and CIFAR-100 (all five under --data-root), DINO ViT-B/16, ImageNet-1K k-NN source "
                "(needs the data, GPUs and data.source=imagefolder:DIR)",
    rows=tuple(r for target, group in TRANSFER_SETS for r in _figure_rows(target, group)), lrs=PAPER_LRS,
    base_args=_PAPER_ARGS, needs_source=True,
    note="The paper draws these runs as its Figure 2 and prints no table of them. DTD and Flowers102 select the "
         "checkpoint on their official val splits; Food101, CIFAR-10 and CIFAR-100 on 10% held out of train.")

PAPER_VITS = Preset(
    name="paper-vits",
    description="the paper's Figure 4: All, Linear, LoRA r=8 and Block Exp. p=3 with DINO ViT-S/16 "
                "(vit_small_patch16_224.dino), CIFAR-100 target, ImageNet-1K k-NN source (needs the data, GPUs "
                "and data.source=imagefolder:DIR)",
    rows=_figure_rows("cifar100", "CIFAR-100", {"full": PaperFigures("", None, 15.77, None)}), lrs=PAPER_LRS,
    base_args=(*_PAPER_ARGS, "--model", "vit_small_patch16_224.dino"), needs_source=True,
    paper_figures_from="Figure 4 (it prints full fine-tuning's ImageNet-1K k-NN alone)",
    note="The paper prints one figure of these runs: full fine-tuning drops DINO ViT-S/16's ImageNet-1K k-NN "
         "accuracy to 15.77% (its Figure 4); LoRA and Block Expansion keep both domains.")

# The second paper's experiment (Bafghi et al. 2025, Fig. 1; ../shared/reference/seeds.md): CLIP ViT-B/16
# fine-tuned on a target, forgetting as zero-shot retention (engine.zeroshot) on another set, robustness as
# accuracy under shift. AdamW with weight decay 0.1 as WiSE-FT and FLYP fine-tune CLIP; the learning rates are
# chosen, not tuned here (not run: no weights). 24 LoRA blocks (q and v of 12): 6.25% is 2 of them, 12.5% 3.
# The paper's Fig. 1 figures (seeds.md) beside the rows they describe. They are its zero-shot loss with an
# ImageNet-1K target (classification and retrieval), ours a CIFAR-10 zero-shot drop after CIFAR-100: the
# same direction of measure, not the same experiment. Its full fine-tuning is FLYP (contrastive), ours
# cross-entropy from the zero-shot head; "7.31 less" is its selective LoRA's reduction on average.
PAPER_ZEROSHOT_SOURCE = ("Bafghi et al. 2025, Fig. 1 (CLIP, ImageNet-1K target, LoRA rank 128; "
                         "../shared/reference/seeds.md)")
CLIP_MODEL = "vit_base_patch16_clip_quickgelu_224.openai"  # OpenAI's QuickGELU (engine.clip_weights)
_CLIP_LORA_LRS = (1e-4, 3e-4, 1e-3)
CLIP = Preset(
    name="clip",
    description="the selective LoRA paper's Figure 1 setting: CLIP ViT-B/16 (OpenAI) fine-tuned on CIFAR-100, "
                "zero-shot retention on CIFAR-10, accuracy under shift (CIFAR-100 corrupted at severity 3), "
                "head from the zero-shot classifier (needs model.weights=ViT-B-16.pt, the data, GPUs and "
                "data.source=imagefolder:DIR)",
    rows=(Row("full", "All", "Standard", "full", paper_zeroshot="16.24% (FLYP)"),
          Row("wise-ft", "WiSE-FT alpha=0.5 of All", "Standard", "full", interpolate=InterpolationOf("full", 0.5)),
          Row("linear", "Linear", "Standard", "linear", lrs=(1e-3, 1e-2, 1e-1)),
          Row("lora-r8", "LoRA r=8", "LoRA", "lora", ("--lora-rank", "8"), _CLIP_LORA_LRS),
          Row("lora-r128", "LoRA r=128", "LoRA", "lora", ("--lora-rank", "128"), _CLIP_LORA_LRS,
              paper_zeroshot="17.12%"),
          *(Row(f"selective-r128-{name}", f"Selective LoRA r=128, {value:.4g}%", "Selective LoRA", "selective_lora",
                ("--lora-rank", "128", "--active-fraction", str(value / 100)), _CLIP_LORA_LRS, paper_zeroshot=paper)
            for name, value, paper in (("6pct", 6.25, "7.31 less (on average)"), ("12pct", 12.5, None)))),
    lrs=(1e-5, 3e-5, 1e-4),
    base_args=("--model", CLIP_MODEL, "--target", "cifar100", "--steps", "10000", "--eval-every", "500",
               "--batch-size", "128", "train.optimizer=adamw", "train.weight_decay=0.1", "train.warmup_steps=500",
               "model.head_init=zeroshot", "eval.zeroshot=cifar10", "eval.shift=corrupt:all@3"),
    needs_source=True,
    note="The paper (Fig. 1, ImageNet-1K target, LoRA rank 128): FLYP loses 16.24% and plain LoRA 17.12% of "
         "zero-shot ability; selective LoRA with 6.25% of the blocks active reduces forgetting by 7.31% on "
         "average; its column here sits beside our zero-shot forgetting, a different target (CIFAR-100) and "
         "zero-shot set (CIFAR-10) than its own, and its full fine-tuning is FLYP where ours is cross-entropy from "
         "the zero-shot head. It publishes no table of these runs. WiSE-FT alpha=0.5 of All: python -m "
         "engine.interpolate on each All run (the head moves from the zero-shot one too), at the learning rate "
         "All's validation accuracy chose.")

# Continual adaptation in the sweep: the sequences of `python -m engine.sequence --preset embedded` (full merged,
# LoRA merged and swapped, selective LoRA swapped, each strategy at its defaults) over three embedded domains, at
# the embedded preset's learning rates; with its stage arguments (no forgetting curve, no shifted test sets).
CONTINUAL_TARGETS = ("digits", "digits-rot90", "digits-inverted")
CONTINUAL = Preset(
    name="continual",
    description="sequences digits -> digits-rot90 -> digits-inverted (engine.sequence): full (merge), LoRA (merge "
                "and swap), selective LoRA (swap) on the embedded default; average accuracy, backward transfer "
                "and mean forgetting per row",
    rows=tuple(Row(f"seq-{key}-{mode}", f"{label} ({mode})", group, strategy,
                   sequence=SequenceOf(CONTINUAL_TARGETS, mode))
               for key, label, group, strategy, mode in (
                   ("full", "All", "Standard", "full", "merge"),
                   ("lora", "LoRA", "LoRA", "lora", "merge"),
                   ("lora", "LoRA", "LoRA", "lora", "swap"),
                   ("selective", "Selective LoRA (TAPS)", "Selective LoRA", "selective_lora", "swap"))),
    lrs=PAPER_LRS, base_args=("eval.knn_curve_limit=0", "eval.shift=none"))

PRESETS = {p.name: p for p in (PAPER, PAPER_TRANSFER, PAPER_VITS, EMBEDDED, SELECTIVE, CLIP, CONTINUAL)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def default_rows(strategies: list[str]) -> tuple[Row, ...]:
    """One row per strategy at its defaults (a sweep without a preset); UserError for an unknown name."""
    unknown = [s for s in strategies if s not in adapters.STRATEGIES]
    if unknown:
        raise UserError(f"unknown strategy {unknown[0]!r}; choose from: {', '.join(adapters.STRATEGIES)}")
    known = {r.strategy: r for r in EMBEDDED.rows if r.key in _QUICK}
    return tuple(Row(s, s, known[s].group if s in known else "Other", s) for s in strategies)
