"""A sweep's report: each row's learning rate chosen by validation accuracy, the paper's table, the figures.

Reads only the run folders' contract files: results.json (target top-1 on the *test* split, source
k-NN before and after), source_knn.json (`best_val_top1`, the validation accuracy that chose the
checkpoint) and config.yaml. Per row, the learning rate with the best mean validation accuracy over
its finished seeds wins (never the test accuracy); its runs' test figures are averaged.

Writes into the sweep folder: `runs.csv` (every run), `table.md` / `table.csv` (the paper's layout:
groups Standard / LoRA / Block Expansion / Selective LoRA; trainable params, target top-1, source
k-NN, mean; the best mean in bold; the paper's own figures beside ours for the `paper` preset),
`figure.png` (target against source, marker area by trainable params), `forgetting.png` (each row's
forgetting curve) and, with two or more selective LoRA rows, `selective.png`.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .curve import read_curve
from .data.datasets import EMBEDDED as EMBEDDED_DATA, IMAGEFOLDER
from .io import atomic_write_text
from .presets import GROUPS

RUN_COLUMNS = ("name", "row", "label", "lr", "seed", "status", "val_top1", "target_top1", "source_knn_before",
               "source_knn_after", "forgetting", "mean", "trainable_params", "active_blocks", "total_blocks",
               "wall_s")
TABLE_COLUMNS = ("group", "row", "label", "strategy", "best_lr", "seeds", "trainable_params", "target_top1",
                 "source_knn", "mean", "forgetting", "source_knn_before", "val_top1", "active_blocks",
                 "total_blocks", "paper_trainable", "paper_target", "paper_source", "paper_mean")


@dataclass
class Finished:
    """A finished run's figures."""
    point: object
    results: dict
    val_top1: float
    config: dict
    curve: list = field(default_factory=list)


def _load(point, sweep_dir: Path) -> Finished | None:
    run_dir = point.run_dir(sweep_dir)
    if not (run_dir / "results.json").is_file():
        return None
    knn = json.loads((run_dir / "source_knn.json").read_text())
    curve = read_curve(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else []
    return Finished(point, json.loads((run_dir / "results.json").read_text()), float(knn["best_val_top1"]),
                    yaml.safe_load((run_dir / "config.yaml").read_text()), curve)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def select(grid, sweep_dir: Path) -> tuple[list[dict], list[Finished]]:
    """Table rows (one per grid row, best learning rate by validation) and every finished run."""
    finished = {p.name: f for p in grid if (f := _load(p, sweep_dir)) is not None}
    rows = []
    for row in dict.fromkeys(p.row for p in grid):
        by_lr: dict[float, list[Finished]] = {}
        for p in grid:
            if p.row == row and p.name in finished:
                by_lr.setdefault(p.lr, []).append(finished[p.name])
        entry = {"group": row.group, "row": row.key, "label": row.label, "strategy": row.strategy,
                 "paper": row.paper, "runs": []}
        if by_lr:
            best_lr = max(by_lr, key=lambda lr: _mean(f.val_top1 for f in by_lr[lr]))  # first of equals wins
            runs = by_lr[best_lr]
            r = [f.results for f in runs]
            entry.update(best_lr=best_lr, seeds=len(runs), runs=runs, trainable_params=r[0]["trainable_params"],
                         target_top1=_mean(x["target_top1"] for x in r), source_knn=_mean(x["source_knn_after"] for x in r),
                         mean=_mean(x["mean"] for x in r), forgetting=_mean(x["forgetting"] for x in r),
                         source_knn_before=_mean(x["source_knn_before"] for x in r),
                         val_top1=_mean(f.val_top1 for f in runs))
            if "active_blocks" in r[0]:
                entry.update(active_blocks=_mean(x["active_blocks"] for x in r), total_blocks=r[0]["total_blocks"])
        rows.append(entry)
    order = {g: i for i, g in enumerate(GROUPS)}
    rows.sort(key=lambda e: order.get(e["group"], len(GROUPS)))  # stable: preset order within a group
    return rows, list(finished.values())


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _describe(finished: list[Finished]) -> tuple[str, str, str]:
    """(target name, source name, report k) from the runs' configs."""
    cfg = finished[0].config
    target, source = (_data_name(cfg["data"][role], role) for role in ("target", "source"))
    return target, source, str(cfg["eval"]["knn_report_k"])


def _data_name(spec: str, role: str) -> str:
    """'embedded' -> the role's data set; 'imagefolder:/data/imagenet' -> 'imagenet'."""
    if spec == "embedded":
        return EMBEDDED_DATA[role]
    return Path(spec[len(IMAGEFOLDER):]).name if spec.startswith(IMAGEFOLDER) else spec


def format_markdown(rows: list[dict], finished: list[Finished], preset) -> str:
    """The paper's layout: one section per group, the best mean (ours, and the paper's) in bold."""
    if not finished:
        return "no run has finished yet"
    target, source, k = _describe(finished)
    with_paper = any(r["paper"] for r in rows)
    done = [r for r in rows if r["runs"]]
    best = max(r["mean"] for r in done) if done else None
    best_paper = max((r["paper"].mean for r in rows if r["paper"]), default=None)
    head = ["Group", "Strategy", "best LR", "Trainable params", f"{target} top-1", f"{source} {k}-NN", "Mean"]
    if with_paper:
        head += ["paper: params", "paper: CIFAR-100", "paper: IN-1K", "paper: Mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    previous = None
    for r in rows:
        group = r["group"] if r["group"] != previous else ""
        previous = r["group"]
        label = r["label"] + (f" ({r['active_blocks']:.3g}/{r['total_blocks']} blocks)" if "active_blocks" in r else "")
        if r["runs"]:
            mean = _fmt(r["mean"])
            cells = [f"{r['best_lr']:g}", _fmt(r["trainable_params"]), _fmt(r["target_top1"]), _fmt(r["source_knn"]),
                     f"**{mean}**" if r["mean"] == best else mean]
        else:
            cells = ["-", "-", "not run", "-", "-"]
        if with_paper:
            p = r["paper"]
            cells += ([p.trainable, _fmt(p.target), _fmt(p.source), f"**{_fmt(p.mean)}**" if p.mean == best_paper
                       else _fmt(p.mean)] if p else ["", "", "", ""])
        lines.append("| " + " | ".join([group, label, *cells]) + " |")
    before = _mean(f.results["source_knn_before"] for f in finished)
    seeds = max((r.get("seeds", 0) for r in rows), default=0)
    notes = [f"Target top-1 on the {target} test split and source weighted {k}-NN accuracy ({source}) after "
             f"fine-tuning, in %; mean = their average. The untouched backbone's source {k}-NN: {before:.2f}%. "
             f"Each row's learning rate was chosen by validation accuracy"
             + (f"; figures are means over {seeds} seeds." if seeds > 1 else ".")]
    if preset is not None and preset.note:
        notes.append(preset.note)
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def _csv(rows: list[dict], columns) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else round(r[k], 4) if isinstance(r.get(k), float) else r[k])
                         for k in columns})
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
        flat.append({**{k: v for k, v in r.items() if k not in ("paper", "runs")},
                     **({"paper_trainable": p.trainable, "paper_target": p.target, "paper_source": p.source,
                         "paper_mean": p.mean} if p else {})})
    return flat


def selective_points(rows: list[dict]) -> tuple[list[dict], dict | None]:
    """selective.png's points (TAPS or budget, from each run's config) and plain LoRA of the same rank."""
    points, ranks = [], set()
    for r in rows:
        if r["strategy"] != "selective_lora" or not r["runs"]:
            continue
        adapter = r["runs"][0].config["adapter"]
        budget = adapter.get("active_blocks") is not None or adapter.get("active_fraction") is not None
        ranks.add(adapter["lora_rank"])
        points.append({"series": "budget" if budget else "TAPS", "label": r["label"],
                       "active_fraction": r["active_blocks"] / r["total_blocks"], "target_top1": r["target_top1"],
                       "forgetting": r["forgetting"]})
    reference = next(({"label": r["label"], "target_top1": r["target_top1"], "forgetting": r["forgetting"]}
                      for r in rows if r["strategy"] == "lora" and r["runs"]
                      and r["runs"][0].config["adapter"]["lora_rank"] in ranks), None)
    return points, reference


def write_report(sweep_dir: Path, grid, preset, outcomes: dict[str, int] | None = None) -> str:
    """Write runs.csv, table.md, table.csv and the figures; return the markdown table. `outcomes`: the
    exit codes on record (3: diverged), shown in runs.csv for runs without results."""
    from .plots import plot_curves, plot_selective, plot_tradeoff

    rows, finished = select(grid, sweep_dir)
    table = format_markdown(rows, finished, preset)
    atomic_write_text(sweep_dir / "runs.csv", _csv(_run_rows(grid, finished, sweep_dir, outcomes or {}), RUN_COLUMNS))
    atomic_write_text(sweep_dir / "table.csv", _csv(_table_rows(rows), TABLE_COLUMNS))
    atomic_write_text(sweep_dir / "table.md", table)
    done = [r for r in rows if r["runs"]]
    if not done:
        return table
    target, source, k = _describe(finished)
    title = f"{preset.name if preset else 'sweep'}: {target} (target) vs {source} (source)"
    plot_tradeoff([dict(r) for r in done], sweep_dir / "figure.png", title)
    curves = {r["label"]: r["runs"][0].curve for r in done if r["runs"][0].curve}
    if curves:
        plot_curves(curves, sweep_dir / "forgetting.png", f"forgetting curves ({source} {k}-NN, each row's best LR)")
    points, reference = selective_points(rows)
    if len(points) >= 2:
        plot_selective(points, sweep_dir / "selective.png",
                       f"selective LoRA on {target}: active blocks vs accuracy and forgetting", reference)
    return table
