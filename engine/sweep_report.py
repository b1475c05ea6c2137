"""A sweep's report: each row's learning rate chosen by validation accuracy, the paper's table with its
spread over seeds, the figures.

Reads only the run folders' contract files: results.json (target top-1 on the *test* split, source
k-NN before and after), source_knn.json (`best_val_top1`, the validation accuracy that chose the
checkpoint), config.yaml and metrics.csv (the forgetting curve). Per row, the learning rate with the
best mean validation accuracy over its finished seeds wins (never the test accuracy); its runs' test
figures are summarised over those seeds: mean, sample standard deviation and the mean's 95% t interval.

Seed s of every row trains on the same data order, so rows are compared seed by seed: a column's
highest mean is the best (bold) only where it beats every other row's by more than the paired 95%
interval of the difference (`separated`); otherwise it and the rows within that noise of it are
marked tied. With one seed no row is marked at all.

Writes into the sweep folder: `runs.csv` (every run), `table.md` / `table.csv` (the paper's layout:
groups Standard / LoRA / Block Expansion / Selective LoRA; trainable params, target top-1, source
k-NN, mean, each as mean +- sd over n seeds, and the mean's interval; the paper's own figures beside
ours for the `paper` preset), `figure.png` (target against source, marker area by trainable params,
bars +- 1 sd), `forgetting.png` (each row's forgetting curve, the mean over seeds in a +- 1 sd band;
`zeroshot.png` the same for CLIP's zero-shot top-1 where the runs measured it, eval.zeroshot),
with two or more selective LoRA rows `selective.png`, and with Block Expansion runs at two or more learning
rates `blockexp_lr.png` (the paper's Figure 3: target and source against p, a line per learning rate, from
every such run, not only the chosen ones).

Rows on several targets (the `paper-transfer` preset: each row's `--target`) are compared only with rows on
the same target: table.md has a `### <data set>` table for each (marks within it), then the means across
data sets (also `means.csv`), and `transfer.png` draws the paper's Figure 2 (per data set, each strategy's
target top-1 and source k-NN side by side).

A sequence row's run (a sequence folder, `engine.sequence`) is read through `engine.sequence.sweep_results`:
its target top-1 is the average accuracy over its targets after the last stage, its source k-NN the
backbone's after the last stage (in swap mode: the untouched one with the last adapter), its validation
top-1 the mean of its stages' (which picks its learning rate). Its average accuracy, backward transfer and
mean forgetting (Avalanche's and mammoth's, engine.continual) get columns of their own, summarised over
seeds as the others are; a single run's cells there are empty.

A derived row's point (`presets.Row.interpolate`, WiSE-FT) is read from its own folder's interpolation.csv
(engine.interpolate) at its alpha: target top-1, source k-NN, shift and zero-shot accuracy there are its
results; its source k-NN before, zero-shot before, trainable parameters, validation accuracy and config are
its source run's, so its forgetting is against the same untouched backbone and its learning rate is the one
the source row's validation accuracy chose. A row's `paper_zeroshot` (the selective LoRA paper's Fig. 1) is
printed in a paper column beside the zero-shot forgetting column.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .curve import read_curve
from .data.datasets import EMBEDDED as EMBEDDED_DATA, IMAGEFOLDER
from .io import atomic_write_text
from .presets import GROUPS

RUN_COLUMNS = ("name", "row", "label", "lr", "seed", "status", "val_top1", "target_top1", "source_knn_before",
               "source_knn_after", "forgetting", "mean", "trainable_params", "active_blocks", "total_blocks",
               "wall_s", "average_accuracy", "backward_transfer", "mean_forgetting")
# Summarised over a row's seeds: (table key, the runs' results.json key; None: source_knn.json's best_val_top1).
STATS = (("target_top1", "target_top1"), ("source_knn", "source_knn_after"), ("mean", "mean"),
         ("forgetting", "forgetting"), ("source_knn_before", "source_knn_before"), ("val_top1", None))
# Figures only some runs have (engine.shift, engine.zeroshot): summarised like STATS for a row whose runs all
# have them, shown as columns when any row does; (table key, how to read it from results.json).
OPTIONAL_STATS = (("target_shift_top1", lambda r: r["target_shift_top1"]),
                  ("zeroshot_after", lambda r: r["zeroshot_after"]["mean"]),
                  ("zeroshot_forgetting", lambda r: r["zeroshot_forgetting"]),
                  ("average_accuracy", lambda r: r["average_accuracy"]),     # a sequence's (sweep_results)
                  ("backward_transfer", lambda r: r["backward_transfer"]),
                  ("mean_forgetting", lambda r: r["mean_forgetting"]))
OPTIONAL_NAMES = {"target_shift_top1": "shift top-1 %", "zeroshot_after": "zero-shot after %",
                  "zeroshot_forgetting": "zero-shot forgetting", "average_accuracy": "sequence: average accuracy %",
                  "backward_transfer": "sequence: backward transfer", "mean_forgetting": "sequence: mean forgetting"}
# The columns that get the best / tied marks, higher being better in each. Source k-NN after
# fine-tuning ranks the rows as forgetting does (every row starts from the same backbone's features).
COMPARED = ("target_top1", "source_knn", "mean")
TABLE_COLUMNS = ("group", "row", "label", "strategy", "best_lr", "seeds", "trainable_params",
                 *(f"{key}{suffix}" for key, _ in STATS for suffix in ("", "_sd", "_ci95_low", "_ci95_high")),
                 *(f"{key}_mark" for key in COMPARED), "active_blocks", "total_blocks",
                 *(f"{key}{suffix}" for key, _ in OPTIONAL_STATS for suffix in ("", "_sd", "_ci95_low", "_ci95_high")),
                 "paper_trainable", "paper_target", "paper_source", "paper_mean", "paper_zeroshot_forgetting")
PAPER_ZEROSHOT_NAME = "paper: zero-shot forgetting"


@dataclass
class Finished:
    """A finished run's figures."""
    point: object
    results: dict
    val_top1: float
    config: dict
    curve: list = field(default_factory=list)
    zeroshot_curve: list = field(default_factory=list)  # CLIP's zero-shot top-1 at the curve's steps, if measured

    def value(self, results_key: str | None) -> float:
        return self.val_top1 if results_key is None else float(self.results[results_key])


@dataclass(frozen=True)
class Spread:
    """Values over n seeds: their mean, sample standard deviation and the mean's 95% t interval
    (mean +- t(0.975, n - 1) sd / sqrt(n)); sd and interval are None for one value."""
    n: int
    mean: float
    sd: float | None = None
    low: float | None = None
    high: float | None = None


@functools.lru_cache(maxsize=None)
def t975(df: int) -> float:
    """The t distribution's 97.5% quantile with `df` degrees of freedom (a two-sided 95% interval)."""
    from scipy.stats import t
    return float(t.ppf(0.975, df))


def spread(values) -> Spread:
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Spread(len(values), mean)
    sd = statistics.stdev(values)
    half = t975(len(values) - 1) * sd / math.sqrt(len(values))
    return Spread(len(values), mean, sd, mean - half, mean + half)


def paired_difference(best: dict[int, float], other: dict[int, float]) -> Spread:
    """best - other over the seeds both have (seed s of each trained on the same data order)."""
    return spread(best[s] - other[s] for s in sorted(set(best) & set(other)))


def separated(difference: Spread) -> bool:
    """The best is ahead by more than the paired 95% interval: its lower end is above 0 (never with
    fewer than two seeds in common)."""
    return difference.low is not None and difference.low > 0


def _load(point, sweep_dir: Path) -> Finished | None:
    run_dir = point.run_dir(sweep_dir)
    if getattr(point.row, "sequence", None) is not None:
        return _load_sequence(point, run_dir)
    if getattr(point, "source", None) is not None:
        return _load_derived(point, sweep_dir)
    if not (run_dir / "results.json").is_file():
        return None
    knn = json.loads((run_dir / "source_knn.json").read_text())
    metrics = run_dir / "metrics.csv"
    curves = [read_curve(metrics, column) for column in ("source_knn", "zeroshot")] if metrics.is_file() else [[], []]
    return Finished(point, json.loads((run_dir / "results.json").read_text()), float(knn["best_val_top1"]),
                    yaml.safe_load((run_dir / "config.yaml").read_text()), *curves)


def _load_derived(point, sweep_dir: Path) -> Finished | None:
    """A derived point's figures at its alpha, over its source run's (see the module's note); None until
    both are there."""
    from .interpolate import row_at
    source = _load(point.source, sweep_dir)
    at = row_at(point.run_dir(sweep_dir), point.row.interpolate.alpha)
    if source is None or at is None:
        return None
    before = source.results
    results = {k: before[k] for k in ("strategy", "trainable_params", "source_knn_before", "active_blocks",
                                      "total_blocks", "zeroshot_before") if k in before}
    results.update(target_top1=at["target_top1"], source_knn_after=at["source_knn"],
                   forgetting=before["source_knn_before"] - at["source_knn"],
                   mean=(at["target_top1"] + at["source_knn"]) / 2, alpha=at["alpha"], source_run=point.source.name)
    if "target_shift_top1" in at:
        results["target_shift_top1"] = at["target_shift_top1"]
    if "zeroshot_mean" in at:
        results["zeroshot_after"] = {"mean": at["zeroshot_mean"]}
        if before.get("zeroshot_before") is not None:
            results["zeroshot_forgetting"] = before["zeroshot_before"]["mean"] - at["zeroshot_mean"]
    return Finished(point, results, source.val_top1, source.config)


def _load_sequence(point, folder: Path) -> Finished | None:
    """A finished sequence as a run (engine.sequence.sweep_results), with its last stage's config; no curve."""
    from .sequence import sweep_results
    read = sweep_results(folder)
    if read is None:
        return None
    results, val_top1 = read
    last = json.loads((folder / "sequence.json").read_text())["stages"][-1]["run"]
    return Finished(point, results, float(val_top1), yaml.safe_load((folder / last / "config.yaml").read_text()))


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    """(step, mean, sd) over the seeds' forgetting curves at the steps every curve has (sd 0 for one)."""
    by_step = [dict(c) for c in curves if c]
    steps = sorted(set.intersection(*(set(c) for c in by_step))) if by_step else []
    out = []
    for step in steps:
        s = spread(c[step] for c in by_step)
        out.append((step, s.mean, s.sd or 0.0))
    return out


def select(grid, sweep_dir: Path) -> tuple[list[dict], list[Finished]]:
    """Table rows (one per grid row, best learning rate by mean validation accuracy over its seeds) and
    every finished run. A row's `values[key]` maps each seed to its run's figure; `key`, `key_sd`,
    `key_ci95_low` / `_high` summarise them; `key_mark` is 'best', 'tied' or '' (see `mark`)."""
    finished = {p.name: f for p in grid if (f := _load(p, sweep_dir)) is not None}
    rows, chosen = [], {}
    for row in dict.fromkeys(p.row for p in grid):
        by_lr: dict[float, list[Finished]] = {}
        for p in grid:
            if p.row == row and p.name in finished:
                by_lr.setdefault(p.lr, []).append(finished[p.name])
        entry = {"group": row.group, "row": row.key, "label": row.label, "strategy": row.strategy,
                 "target": _row_target(row),
                 "paper": row.paper, "sequence": getattr(row, "sequence", None),
                 "interpolate": getattr(row, "interpolate", None),
                 "paper_zeroshot_forgetting": getattr(row, "paper_zeroshot", None), "runs": []}
        if by_lr:
            best_lr = max(by_lr, key=lambda lr: statistics.fmean(f.val_top1 for f in by_lr[lr]))  # first of equals
            if entry["interpolate"] is not None:  # the source row's choice (grid order: sources come first)
                best_lr = chosen.get(entry["interpolate"].source)
                by_lr = by_lr if best_lr in by_lr else {}
        if by_lr:
            chosen[row.key] = best_lr
            runs = by_lr[best_lr]
            r = [f.results for f in runs]
            entry.update(best_lr=best_lr, seeds=len(runs), runs=runs, trainable_params=r[0]["trainable_params"],
                         values={})
            for key, results_key in STATS:
                entry["values"][key] = {f.point.seed: f.value(results_key) for f in runs}
                s = spread(entry["values"][key].values())
                entry.update({key: s.mean, f"{key}_sd": s.sd, f"{key}_ci95_low": s.low, f"{key}_ci95_high": s.high})
            for key, read in OPTIONAL_STATS:
                if all(x.get(key) is not None for x in r):
                    s = spread(read(f.results) for f in runs)
                    entry.update({key: s.mean, f"{key}_sd": s.sd, f"{key}_ci95_low": s.low, f"{key}_ci95_high": s.high})
            if "active_blocks" in r[0]:
                entry.update(active_blocks=statistics.fmean(x["active_blocks"] for x in r),
                             total_blocks=r[0]["total_blocks"])
        rows.append(entry)
    order = {g: i for i, g in enumerate(GROUPS)}
    rows.sort(key=lambda e: order.get(e["group"], len(GROUPS)))  # stable: preset order within a group
    for _, section in target_sections(rows):  # rows on different targets are never compared
        for key in COMPARED:
            mark(section, key)
    return rows, list(finished.values())


def _row_target(row) -> str | None:
    """The target a row's own arguments name (`--target X`), None where it trains on the sweep's."""
    args = list(row.args)
    return args[args.index("--target") + 1] if "--target" in args[:-1] else None


def target_sections(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The rows split by the target they train on, in order: (title, rows) each, one section (title '')
    where every row trains on the same one. A section's title is its rows' group where they share one
    (the paper-transfer preset groups by data set), else the target's name."""
    by_target: dict[str | None, list[dict]] = {}
    for r in rows:
        by_target.setdefault(r["target"], []).append(r)
    if len(by_target) == 1:
        return [("", rows)]
    return [(groups.pop() if len(groups := {r["group"] for r in section}) == 1 else target or "the sweep's target",
             section) for target, section in by_target.items()]


def mark(rows: list[dict], key: str) -> None:
    """Set each row's `key_mark`: 'best' for the highest mean where `separated` from every other row
    (paired over common seeds); else 'tied' for the highest and each row not separated from it. No
    marks with one seed per row or fewer than two rows. Each row's `key_vs_top` holds the paired
    difference (top - row) the decision used."""
    done = [r for r in rows if r["runs"]]
    for r in rows:
        r[f"{key}_mark"] = ""
    if len(done) < 2 or all(r["seeds"] == 1 for r in done):
        return
    top = max(done, key=lambda r: r[key])  # first of equals
    ties = []
    for r in done:
        if r is not top:
            r[f"{key}_vs_top"] = paired_difference(top["values"][key], r["values"][key])
            if not separated(r[f"{key}_vs_top"]):
                ties.append(r)
    top[f"{key}_mark"] = "tied" if ties else "best"
    for r in ties:
        r[f"{key}_mark"] = "tied"


def _extra_cell(r: dict, key: str) -> str:
    if key == "paper_zeroshot_forgetting":
        return r[key] or ""
    return _cell(r, key) if key in r else "-"


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _describe(finished: list[Finished]) -> tuple[str, str, str]:
    """(target name, source name, report k) from the runs' configs: a single run's where there is one,
    else a sequence's targets in order."""
    single = [f for f in finished if "average_accuracy" not in f.results]
    cfg = (single or finished)[0].config
    target, source = (_data_name(cfg["data"][role], role) for role in ("target", "source"))
    if not single:
        target = " -> ".join(finished[0].results["targets"])
    return target, source, str(cfg["eval"]["knn_report_k"])


def _data_name(spec: str, role: str) -> str:
    """'embedded' -> the role's data set; 'imagefolder:/data/imagenet' -> 'imagenet'."""
    if spec == "embedded":
        return EMBEDDED_DATA[role]
    return Path(spec[len(IMAGEFOLDER):]).name if spec.startswith(IMAGEFOLDER) else spec


def _cell(r: dict, key: str) -> str:
    """mean +- sd (the mean alone for one seed), bold where best, '(tied)' where tied for best."""
    text = _fmt(r[key]) + (f" +- {_fmt(r[key + '_sd'])}" if r.get(key + "_sd") is not None else "")
    mark = r.get(f"{key}_mark")
    return f"**{text}**" if mark == "best" else f"{text} (tied)" if mark == "tied" else text


def _interval(r: dict, key: str) -> str:
    return f"{_fmt(r[key + '_ci95_low'])} to {_fmt(r[key + '_ci95_high'])}" if r.get(key + "_ci95_low") is not None \
        else "-"


def _ties_note(rows: list[dict], key: str, name: str) -> str | None:
    """'Mean: no row is best. ...' for a column whose highest mean is within noise of another row's."""
    done = [r for r in rows if r["runs"]]
    top = max(done, key=lambda r: r[key], default=None)  # as `mark` chose it
    if top is None or top[f"{key}_mark"] != "tied":
        return None
    within = []
    for r in done:
        d = r.get(f"{key}_vs_top")
        if r[f"{key}_mark"] == "tied" and d is not None:
            within.append(f"{r['label']} ({_fmt(d.mean)}, 95% interval {_fmt(d.low)} to {_fmt(d.high)} over "
                          f"{d.n} seeds)" if d.low is not None else f"{r['label']} (fewer than two seeds in common)")
    return (f"{name}: no row is best. {top['label']} has the highest ({_fmt(top[key])}); within noise of it, "
            f"{top['label']} minus each: " + "; ".join(within) + ".")


def format_markdown(rows: list[dict], finished: list[Finished], preset) -> str:
    """The paper's layout: one section per group, each cell mean +- sd over the row's seeds, the best
    (where separated from every other row) in bold, rows within noise of the highest marked tied. Rows
    on several targets (paper-transfer) get a table per target, as `### title` sections, then the means
    across the targets."""
    if not finished:
        return "no run has finished yet"
    sections = target_sections(rows)
    if len(sections) == 1:
        lines, ties = _table(rows, finished)
        target = _describe(finished)[0]
        return "\n".join(lines) + "\n\n" + "\n\n".join(
            _notes(rows, finished, preset, f"the {target} test split", ties)) + "\n"
    parts = []
    for title, section in sections:
        keys = {r["row"] for r in section}
        mine = [f for f in finished if f.point.row.key in keys]
        if not mine:
            parts.append(f"### {title}\n\nno run has finished yet\n")
            continue
        lines, ties = _table(section, mine)
        parts.append(f"### {title}\n\n" + "\n".join(lines) + "".join(f"\n\n{t}" for t in ties) + "\n")
    means = transfer_means(sections)
    _, source, k = _describe(finished)
    parts.append(f"### Mean across the {len(sections)} data sets\n\n" + "\n".join(_means_table(means, source, k))
                 + "\n\nEach cell: the mean over the data sets a strategy has finished runs on (the sets column) "
                   "of its row there (that row's best learning rate, its mean over seeds); no marks, since the "
                   "data sets differ in size and difficulty.\n")
    return "\n".join(parts) + "\n" + "\n\n".join(_notes(rows, finished, preset, "each data set's test split",
                                                            [])) + "\n"


def _table(rows: list[dict], finished: list[Finished]) -> tuple[list[str], list[str]]:
    """One table's markdown lines (rows on one target) and the notes on its tied columns."""
    target, source, k = _describe(finished)
    with_paper = any(r["paper"] for r in rows)
    done = [r for r in rows if r["runs"]]
    seeds = max((r["seeds"] for r in done), default=0)
    best_paper = max((r["paper"].mean for r in rows if r["paper"] and r["paper"].mean is not None), default=None)
    names = {"target_top1": f"{target} top-1", "source_knn": f"{source} {k}-NN", "mean": "Mean"}
    extra = [key for key, _ in OPTIONAL_STATS if any(key in r for r in done)]
    if any(r["paper_zeroshot_forgetting"] for r in rows):  # beside ours where we have it, else last
        at = extra.index("zeroshot_forgetting") + 1 if "zeroshot_forgetting" in extra else len(extra)
        extra.insert(at, "paper_zeroshot_forgetting")
    head = ["Group", "Strategy", "best LR", "n", "Trainable params", *names.values(),
            *(["Mean 95% CI"] if seeds > 1 else []),
            *(OPTIONAL_NAMES.get(key, PAPER_ZEROSHOT_NAME) for key in extra)]
    if with_paper:
        head += ["paper: params", "paper: CIFAR-100", "paper: IN-1K", "paper: Mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    previous = None
    for r in rows:
        group = r["group"] if r["group"] != previous else ""
        previous = r["group"]
        label = r["label"] + (f" ({r['active_blocks']:.3g}/{r['total_blocks']} blocks)" if "active_blocks" in r else "")
        if r["runs"]:
            cells = [f"{r['best_lr']:g}", str(r["seeds"]), _fmt(r["trainable_params"]),
                     *(_cell(r, key) for key in names), *([_interval(r, "mean")] if seeds > 1 else []),
                     *(_extra_cell(r, key) for key in extra)]
        else:
            cells = ["-", "0", "-", "not run", "-", "-", *(["-"] if seeds > 1 else []),
                     *(_extra_cell(r, key) if key == "paper_zeroshot_forgetting" else "-" for key in extra)]
        if with_paper:
            p = r["paper"]
            cells += ([p.trainable, _fmt(p.target), _fmt(p.source), f"**{_fmt(p.mean)}**" if p.mean is not None
                       and p.mean == best_paper else _fmt(p.mean)] if p else ["", "", "", ""])
        lines.append("| " + " | ".join([group, label, *cells]) + " |")
    ties = [n for key, name in names.items() if (n := _ties_note(rows, key, name))] if seeds > 1 else []
    return lines, ties


def _notes(rows: list[dict], finished: list[Finished], preset, split: str, ties: list[str]) -> list[str]:
    """What the table's cells are (`split`: where target top-1 was measured), its tie notes, and a note
    for each kind of column or row it holds."""
    _, source, k = _describe(finished)
    done = [r for r in rows if r["runs"]]
    seeds = max((r["seeds"] for r in done), default=0)
    extra = {key for key, _ in OPTIONAL_STATS if any(key in r for r in done)}
    before = statistics.fmean(f.results["source_knn_before"] for f in finished)
    notes = [f"Target top-1 on {split} and source weighted {k}-NN accuracy ({source}) after "
             f"fine-tuning, in %; mean = their average. The untouched backbone's source {k}-NN: {before:.2f}%. "
             f"Each row's learning rate was chosen by its mean validation accuracy over its seeds (never test)."]
    if seeds > 1:
        notes.append(
            "Each cell: mean +- sample standard deviation over the row's n seeds (the value alone for n = 1); "
            "Mean 95% CI: mean +- "
            "t(0.975, n-1) sd / sqrt(n). Seed s of every row trains on the same data order, so rows are compared "
            "seed by seed: in each of the target, source and mean columns the highest mean is bold only where it "
            "beats every other row's by more than the paired 95% interval of the difference (d_s = best_s - "
            "other_s over the seeds both have: mean(d) - t(0.975, n-1) sd(d) / sqrt(n) > 0). Where it does not, "
            "no row is best: the highest and the rows not separated from it are marked (tied). The highest "
            f"source {k}-NN is the least forgetting (every row starts from the same backbone).")
        notes += ties
    elif done:
        notes.append("One seed per row: no row is marked best, since one run per row cannot tell a difference "
                     "between rows from seed noise; give --seeds 0,1,2 to compare them.")
    if "target_shift_top1" in extra:
        notes.append("Shift top-1: the mean target top-1 over the run's eval.shift sets (results.json shift_top1 "
                     "holds each set's).")
    if "zeroshot_after" in extra:
        notes.append("Zero-shot after: CLIP's zero-shot top-1 after fine-tuning, mean over the eval.zeroshot sets; "
                     "zero-shot forgetting: that mean before fine-tuning minus after, in points.")
    sequences = [r for r in done if r["sequence"] is not None]
    if sequences:
        notes.append(
            "Sequence rows (engine.sequence, each stage a run with a new head for its target): "
            + "; ".join(f"{r['label']}: {' -> '.join(r['sequence'].targets)}, adapters {r['sequence'].adapters}"
                        for r in sequences)
            + ". Their target top-1 is the average accuracy over their targets after the last stage, their source "
              "k-NN the backbone's after the last stage; average accuracy, backward transfer and mean forgetting "
              "(points) as Avalanche and mammoth define them over the accuracy matrix (engine.continual); their "
              "learning rate chosen by the mean of the stages' validation accuracy. Single runs leave these "
              "columns empty (-).")
    if any(r["paper_zeroshot_forgetting"] for r in rows):
        from .presets import PAPER_ZEROSHOT_SOURCE
        notes.append(f"{PAPER_ZEROSHOT_NAME[0].upper()}{PAPER_ZEROSHOT_NAME[1:]}: the figures as printed in "
                     f"{PAPER_ZEROSHOT_SOURCE}, on the rows they describe (empty where it has none).")
    derived = [r for r in done if r["interpolate"] is not None]
    if derived:
        notes.append("Interpolated rows (engine.interpolate, WiSE-FT: weights (1 - alpha) untouched + alpha "
                     "fine-tuned, each row's own folder): " + "; ".join(
                         f"{r['label']}: alpha {r['interpolate'].alpha:g} of each {r['interpolate'].source} run"
                         for r in derived)
                     + ". Their learning rate is the one their source row's validation accuracy chose; forgetting "
                       "against the source run's untouched backbone; nothing is trained for them.")
    if any(r["paper"] for r in rows):
        where = preset.paper_figures_from if preset is not None else "Table 1"
        notes.append(f"The paper's columns are its {where} as printed (its best mean in bold; - where it prints "
                     f"none).")
    if preset is not None and preset.note:
        notes.append(preset.note)
    return notes


MEAN_KEYS = ("target_top1", "source_knn", "mean", "forgetting")  # averaged across data sets (transfer_means)


def transfer_means(sections: list[tuple[str, list[dict]]]) -> list[dict]:
    """Per strategy label, in first-seen order: each of MEAN_KEYS averaged over the sections (data sets)
    where its row has finished runs, with `sets` (how many) of `of` (all sections)."""
    by_label: dict[str, list[dict]] = {}
    for _, section in sections:
        for r in section:
            by_label.setdefault(r["label"], [])
            if r["runs"]:
                by_label[r["label"]].append(r)
    return [{"label": label, "sets": len(done), "of": len(sections),
             **{key: statistics.fmean(r[key] for r in done) if done else None for key in MEAN_KEYS}}
            for label, done in by_label.items()]


def _means_table(means: list[dict], source: str, k: str) -> list[str]:
    head = ["Strategy", "sets", "target top-1", f"{source} {k}-NN", "Mean", "Forgetting"]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join([m["label"], f"{m['sets']} of {m['of']}", *(_fmt(m[key]) for key in MEAN_KEYS)])
              + " |" for m in means)]


_LR_COLUMNS = ("lr", "best_lr")  # learning rates as given: CLIP's 1e-05 survives no rounding to 4 places


def _csv(rows: list[dict], columns) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else f"{r[k]:g}" if k in _LR_COLUMNS  # 1e-05, not 0.0
                             else round(r[k], 4) if isinstance(r.get(k), float) else r[k]) for k in columns})
    return buffer.getvalue()


def _run_rows(grid, finished: list[Finished], sweep_dir: Path, outcomes: dict[str, int]) -> list[dict]:
    by_name = {f.point.name: f for f in finished}
    rows = []
    for p in grid:
        row = {"name": p.name, "row": p.row.key, "label": p.row.label, "lr": p.lr, "seed": p.seed}
        f = by_name.get(p.name)
        if f is None:
            code = outcomes.get(p.name)
            row["status"] = (f"exit {code}" if code is not None else
                             "partial" if p.run_dir(sweep_dir).exists() else "not run")
        else:
            row.update(status="done", val_top1=f.val_top1, **{k: f.results.get(k) for k in RUN_COLUMNS if k in f.results})
        rows.append(row)
    return rows


def _table_rows(rows: list[dict]) -> list[dict]:
    flat = []
    for r in rows:
        p = r["paper"]
        flat.append({**{k: v for k, v in r.items() if k not in ("paper", "runs", "interpolate", "sequence")},
                     **({"paper_trainable": p.trainable, "paper_target": p.target, "paper_source": p.source,
                         "paper_mean": p.mean} if p else {})})
    return flat


def selective_points(rows: list[dict]) -> tuple[list[dict], dict | None]:
    """selective.png's points (TAPS or budget, from each run's config) and plain LoRA of the same rank."""
    points, ranks = [], set()
    for r in rows:
        if r["strategy"] != "selective_lora" or not r["runs"] or r["sequence"] is not None:
            continue
        adapter = r["runs"][0].config["adapter"]
        budget = adapter.get("active_blocks") is not None or adapter.get("active_fraction") is not None
        ranks.add(adapter["lora_rank"])
        points.append({"series": "budget" if budget else "TAPS", "label": r["label"],
                       "active_fraction": r["active_blocks"] / r["total_blocks"], "target_top1": r["target_top1"],
                       "forgetting": r["forgetting"]})
    reference = next(({"label": r["label"], "target_top1": r["target_top1"], "forgetting": r["forgetting"]}
                      for r in rows if r["strategy"] == "lora" and r["runs"] and r["sequence"] is None
                      and r["runs"][0].config["adapter"]["lora_rank"] in ranks), None)
    return points, reference


def write_report(sweep_dir: Path, grid, preset, outcomes: dict[str, int] | None = None,
                 stale: dict[str, list[str]] | None = None) -> str:
    """Write runs.csv, table.md, table.csv and the figures; return the markdown table. `outcomes`: the
    exit codes on record (3: diverged), shown in runs.csv for runs without results; `stale`: runs kept
    with --reuse-stale although they differ from what the sweep would run now (name -> how), named
    under the table."""
    from .plots import plot_against_blocks, plot_curves, plot_selective, plot_tradeoff, plot_transfer

    rows, finished = select(grid, sweep_dir)
    table = format_markdown(rows, finished, preset)
    if stale and finished:
        table += ("\nKept with --reuse-stale although they differ from what this sweep runs now (config.yaml or "
                  "package versions): " + "; ".join(f"{name} ({', '.join(why[:2])})" for name, why in stale.items())
                  + ".\n")
    atomic_write_text(sweep_dir / "runs.csv", _csv(_run_rows(grid, finished, sweep_dir, outcomes or {}), RUN_COLUMNS))
    atomic_write_text(sweep_dir / "table.csv", _csv(_table_rows(rows), TABLE_COLUMNS))
    atomic_write_text(sweep_dir / "table.md", table)
    done = [r for r in rows if r["runs"]]
    if not done:
        return table
    target, source, k = _describe(finished)
    sections = target_sections(rows)
    name = preset.name if preset else "sweep"
    title = f"{name}: {target if len(sections) == 1 else 'each data set'} (target) vs {source} (source)"
    seeds = max(r["seeds"] for r in done)
    plot_tradeoff([dict(r) for r in done], sweep_dir / "figure.png",
                  title + (f"\nbars: +- 1 sd over each row's seeds (up to {seeds})" if seeds > 1 else ""))
    named = {r["row"]: f"{heading}: {r['label']}" if heading else r["label"] for heading, section in sections
             for r in section}  # "DTD: All", where several targets' rows share a label
    curves = {named[r["row"]]: curve for r in done if (curve := mean_curve([f.curve for f in r["runs"]]))}
    if curves:
        plot_curves(curves, sweep_dir / "forgetting.png", f"forgetting curves ({source} {k}-NN, each row's best LR"
                    + (f"; mean over seeds, band +- 1 sd)" if seeds > 1 else ")"))
    zeroshot = {named[r["row"]]: c for r in done if (c := mean_curve([f.zeroshot_curve for f in r["runs"]]))}
    if zeroshot:
        plot_curves(zeroshot, sweep_dir / "zeroshot.png", "zero-shot retention (CLIP, mean over eval.zeroshot; each "
                    "row's best LR" + (f"; mean over seeds, band +- 1 sd)" if seeds > 1 else ")"),
                    ylabel="zero-shot top-1 %")
    points, reference = selective_points(rows)
    if len(points) >= 2:
        plot_selective(points, sweep_dir / "selective.png",
                       f"selective LoRA on {target}: active blocks vs accuracy and forgetting", reference)
    if len(sections) > 1:
        atomic_write_text(sweep_dir / "means.csv", _csv(transfer_means(sections), ("label", "sets", "of", *MEAN_KEYS)))
        before = statistics.fmean(f.results["source_knn_before"] for f in finished)
        plot_transfer({heading: [r for r in section if r["runs"]] for heading, section in sections
                       if any(r["runs"] for r in section)}, sweep_dir / "transfer.png",
                      f"{name}: each strategy's target top-1 and source {k}-NN per data set (best LR"
                      + (f"; bars +- 1 sd over up to {seeds} seeds)" if seeds > 1 else ")"), f"{source} {k}-NN",
                      before)
    blocks = blockexp_points(rows, finished)
    if any(len(by_lr) > 1 for by_lr in blocks.values()):
        plot_against_blocks(blocks, sweep_dir / "blockexp_lr.png",
                            f"{name}: Block Expansion against p at each learning rate"
                            + (" (mean over seeds)" if seeds > 1 else ""), f"{source} {k}-NN")
    return table


def blockexp_points(rows: list[dict], finished: list[Finished]) -> dict[str, dict[float, list[tuple]]]:
    """blockexp_lr.png's points from every finished single Block Expansion run, at every learning rate
    (not only the chosen one): per section title (data set), per learning rate, (p, target top-1,
    source k-NN) each averaged over seeds."""
    title_of = {r["row"]: title for title, section in target_sections(rows) for r in section}
    runs: dict[str, dict[float, dict[int, list[Finished]]]] = {}
    for f in finished:
        row = f.point.row
        if (row.strategy != "block_expansion" or getattr(row, "sequence", None) is not None
                or getattr(f.point, "source", None) is not None):  # a sequence's or an interpolated point
            continue
        p = int(f.config["adapter"]["blocks"])
        runs.setdefault(title_of[row.key], {}).setdefault(f.point.lr, {}).setdefault(p, []).append(f)
    return {title: {lr: [(p, statistics.fmean(f.value("target_top1") for f in fs),
                          statistics.fmean(f.value("source_knn_after") for f in fs)) for p, fs in by_p.items()]
                    for lr, by_p in by_lr.items()} for title, by_lr in runs.items()}
