"""The study's figures (matplotlib, drawn off-screen): forgetting curves, the paper's transfer-vs-source
plot, selective LoRA's active-fraction curve, and a sequence's accuracy matrices and source k-NN per stage
(engine.sequence), the paper's Figure 2 (per data set, target and source bars) and Figure 3 (Block Expansion
against p, a line per learning rate). Each function takes plain numbers and writes one PNG."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out


def plot_curves(curves: dict[str, Sequence[tuple]], out: str | Path, title: str,
                ylabel: str = "source k-NN accuracy %") -> Path:
    """Forgetting curves, one line per label: step (symmetric log, so step 0 shows) against source k-NN.
    Points are (step, value) or (step, mean, sd): a band of mean +- sd is drawn where any sd is above 0."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, points) in enumerate(curves.items()):
        if points:
            steps, values, *spread = zip(*points)
            # the colour cycle has 10 entries: lines past it change dash and marker, so none share a look
            ax.plot(steps, values, color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3],
                    marker="os^"[i // 10 % 3], markersize=3, label=label)
            if spread and any(sd > 0 for sd in spread[0]):
                ax.fill_between(steps, [v - sd for v, sd in zip(values, spread[0])],
                                [v + sd for v, sd in zip(values, spread[0])], color=f"C{i % 10}", alpha=0.15,
                                linewidth=0)
    ax.set_xscale("symlog", linthresh=1)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0, 1, 10, 100 (not 10^2)
    ax.set_xlabel("training step (log scale; 0 = untouched backbone)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)


def plot_tradeoff(rows: Sequence[dict], out: str | Path, title: str) -> Path:
    """The paper's picture: target top-1 against source k-NN, one marker per row (`label`, `group`,
    `target_top1`, `source_knn`, `trainable_params`), marker area growing with log trainable params;
    error bars of +- `target_top1_sd` / `source_knn_sd` where a row has them (two or more seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    logs = [math.log10(max(r["trainable_params"], 1)) for r in rows]
    low, high = min(logs), max(logs)
    groups = list(dict.fromkeys(r["group"] for r in rows))
    colours = {g: f"C{i}" for i, g in enumerate(groups)}
    for r, lg in zip(rows, logs):
        size = 40 + 460 * ((lg - low) / (high - low) if high > low else 0.5)
        ax.scatter(r["source_knn"], r["target_top1"], s=size, color=colours[r["group"]], alpha=0.6,
                   edgecolors="black", linewidths=0.5)
        if r.get("target_top1_sd") is not None:
            ax.errorbar(r["source_knn"], r["target_top1"], xerr=r["source_knn_sd"], yerr=r["target_top1_sd"],
                        fmt="none", ecolor=colours[r["group"]], elinewidth=1, capsize=3)
        ax.annotate(r["label"], (r["source_knn"], r["target_top1"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    for g in groups:
        ax.scatter([], [], color=colours[g], label=g, s=40)
    ax.set_xlabel("source k-NN accuracy % (stability)")
    ax.set_ylabel("target top-1 % (plasticity)")
    ax.set_title(f"{title}\nmarker area: log10 trainable parameters ({_short(10 ** low)} to {_short(10 ** high)})",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out)


def plot_selective(points: Sequence[dict], out: str | Path, title: str, reference: dict | None = None) -> Path:
    """Selective LoRA's own curve: active fraction of the LoRA blocks against target top-1 and
    forgetting. `points` carry `series` (e.g. 'TAPS' or 'budget'), `label`, `active_fraction`,
    `target_top1` and `forgetting`; `reference` (plain LoRA) is drawn as a dashed line."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    series = list(dict.fromkeys(p["series"] for p in points))
    for i, name in enumerate(series):
        mine = sorted((p for p in points if p["series"] == name), key=lambda p: p["active_fraction"])
        xs = [p["active_fraction"] for p in mine]
        for ax, key in ((top, "target_top1"), (bottom, "forgetting")):
            ax.plot(xs, [p[key] for p in mine], marker="os^"[i % 3], color=f"C{i}", label=name)
        for p in mine:
            top.annotate(p["label"], (p["active_fraction"], p["target_top1"]), fontsize=6, xytext=(3, 3),
                         textcoords="offset points")
    if reference is not None:
        for ax, key in ((top, "target_top1"), (bottom, "forgetting")):
            ax.axhline(reference[key], color="grey", linestyle="--", label=reference.get("label", "lora"))
    top.set_ylabel("target top-1 %")
    bottom.set_ylabel("forgetting (source k-NN points lost)")
    bottom.set_xlabel("active fraction of the LoRA blocks at the end")
    top.set_title(title)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)


def _short(n: float) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f}"


def plot_matrices(panels: dict[str, tuple[Sequence[Sequence[float | None]], Sequence[str]]], out: str | Path,
                  title: str) -> Path:
    """Accuracy matrices as heat maps, one panel per label: `panels[label] = (R, targets)`, R[t][j] the
    top-1 (%) on target j after stage t, None where target j is not yet seen (left blank)."""
    plt = _pyplot()
    import numpy as np
    n = len(panels)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols + 1, 4.2 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, (label, (matrix, targets)) in zip(axes.flat, panels.items()):
        values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
        image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (t, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, t, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 60 else "black")
        ax.set_xticks(range(len(targets)), [str(x) for x in targets], fontsize=7)
        ax.set_yticks(range(len(matrix)), [f"{t + 1}: {targets[t]}" for t in range(len(matrix))], fontsize=7,
                      rotation=90, va="center")
        ax.set_xlabel("evaluated on (own head)", fontsize=8)
        ax.set_ylabel("after stage", fontsize=8)
        ax.set_title(label, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="top-1 %")
    fig.suptitle(title, fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)  # laid out by the figure itself (constrained: it fits the shared colour bar)
    plt.close(fig)
    return out


def plot_stages(lines: dict[str, Sequence[float]], stage_labels: Sequence[str], out: str | Path, title: str,
                ylabel: str = "source k-NN accuracy %") -> Path:
    """One value per stage for each label (`lines[label][i]` at `stage_labels[i]`; index 0 is the
    untouched model): the source k-NN after each stage of a sequence, one line per strategy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, values) in enumerate(lines.items()):
        ax.plot(range(len(values)), values, color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3],
                marker="os^D"[i % 4], markersize=4, label=label)
    ax.set_xticks(range(len(stage_labels)), list(stage_labels), fontsize=8)
    ax.set_xlabel("after stage")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_transfer(panels: dict[str, Sequence[dict]], out: str | Path, title: str, source_name: str,
                  before: float | None = None) -> Path:
    """The paper's Figure 2 layout: one panel per data set (`panels[title]`), in it each strategy's
    target top-1 and source k-NN side by side as bars (`label`, `target_top1`, `source_knn`, and
    `target_top1_sd` / `source_knn_sd` as +- 1 sd bars where given); `before`: the untouched backbone's
    source k-NN, a dashed line in every panel."""
    plt = _pyplot()
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    width = 0.38
    for ax, (name, bars) in zip(axes.flat, panels.items()):
        xs = range(len(bars))
        for shift, key, colour, what in ((-width / 2, "target_top1", "C0", "target top-1"),
                                         (width / 2, "source_knn", "C1", f"source {source_name}")):
            ax.bar([x + shift for x in xs], [b[key] for b in bars], width, color=colour, label=what,
                   yerr=[b.get(f"{key}_sd") or 0 for b in bars], capsize=2, error_kw={"elinewidth": 0.8})
        if before is not None:
            ax.axhline(before, color="grey", linestyle="--", linewidth=1, label="source, untouched")
        ax.set_xticks(list(xs), [b["label"] for b in bars], fontsize=7, rotation=20)
        ax.set_xlim(-0.6, max(len(bars), 4) - 0.4)  # bars as wide in every panel, however few strategies ran
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy %")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def plot_against_blocks(panels: dict[str, dict[float, Sequence[tuple]]], out: str | Path, title: str,
                        source_name: str) -> Path:
    """The paper's Figure 3 layout: Block Expansion's target top-1 (left) and source k-NN (right)
    against p, the number of added blocks, one line per learning rate; a row of two panels per data
    set. `panels[data set][lr]` holds (p, target top-1, source k-NN) points."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 3.6 * len(panels)), squeeze=False)
    for (left, right), (name, by_lr) in zip(axes, panels.items()):
        for i, (lr, points) in enumerate(sorted(by_lr.items(), reverse=True)):
            ps, target, source = zip(*sorted(points))
            for ax, values in ((left, target), (right, source)):
                ax.plot(ps, values, marker="os^D"[i % 4], color=f"C{i % 10}", label=f"lr {lr:g}")
        for ax, what in ((left, "target top-1 %"), (right, f"source {source_name} %")):
            ax.set_xlabel("p (blocks added)")
            ax.set_ylabel(what)
            ax.set_title(f"{name}: {what}" if name else what, fontsize=9)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)
