"""The sweep's report over seeds, built from written run folders (no training): each cell's mean, sample
standard deviation and t interval against hand computation, the learning rate chosen by mean
validation accuracy, the paired tie rule both ways, the one-seed case and the figures' spread."""
import csv
import math

import pytest

import engine.plots
from engine.presets import EMBEDDED
from engine.sweep import build_grid
from engine.sweep_report import write_report

from test_sweep import fake_run

T975_2 = 4.3027  # t(0.975) with 2 degrees of freedom, from a printed table: three seeds
ROWS = (EMBEDDED.row("linear"), EMBEDDED.row("lora-r8"))
# Two rows fixed at LR 0.05; per seed: (validation, target top-1, source k-NN after).
SEPARATED = {"linear": [(60, 60, 90), (61, 70, 90), (62, 80, 90)],  # ahead by 1 point at every seed ...
             "lora-r8": [(50, 59, 90), (51, 69, 90), (52, 79, 90)]}  # ... while the seeds spread by 20
WITHIN_NOISE = {"linear": [(60, 60, 90), (61, 62, 90), (62, 67, 90)],
                "lora-r8": [(50, 62, 80), (51, 58, 80), (52, 66, 80)]}


def write_runs(sweep_dir, runs, seeds=(0, 1, 2), lrs=(0.05,)):
    grid = build_grid(ROWS, list(seeds), lrs=lrs)
    for p in grid:
        if p.seed in seeds and (p.row.key, p.lr, p.seed) in runs:
            val, target, source = runs[p.row.key, p.lr, p.seed]
            fake_run(sweep_dir / p.name, p.row.strategy, val, target, source, 1290)
    return grid


def at_lr(figures, lr=0.05):
    return {(row, lr, seed): v for row, per_seed in figures.items() for seed, v in enumerate(per_seed)}


def table(sweep_dir):
    with open(sweep_dir / "table.csv") as f:
        return {r["row"]: r for r in csv.DictReader(f)}


def test_each_cell_is_the_mean_and_sample_sd_over_seeds_with_the_means_t_interval(tmp_path):
    md = write_report(tmp_path, write_runs(tmp_path, at_lr(WITHIN_NOISE)), EMBEDDED)
    linear = table(tmp_path)["linear"]
    # linear's target top-1 over seeds 0, 1, 2: 60, 62, 67; mean 63, deviations -3, -1, 4
    sd = math.sqrt((9 + 1 + 16) / 2)
    half = T975_2 * sd / math.sqrt(3)
    assert linear["seeds"] == "3"
    assert float(linear["target_top1"]) == 63.0
    assert float(linear["target_top1_sd"]) == pytest.approx(sd, abs=1e-4)
    assert float(linear["target_top1_ci95_low"]) == pytest.approx(63 - half, abs=1e-3)
    assert float(linear["target_top1_ci95_high"]) == pytest.approx(63 + half, abs=1e-3)
    # mean = (target + 90) / 2 per seed: 75, 76, 78.5
    assert float(linear["mean"]) == pytest.approx(76.5)
    assert float(linear["mean_sd"]) == pytest.approx(sd / 2, abs=1e-4)
    assert linear["source_knn_sd"] == "0.0"  # 90 at every seed
    lines = md.splitlines()
    assert lines[0] == "| Group | Strategy | best LR | n | Trainable params | cifar100 top-1 | imagenet 20-NN | Mean | Mean 95% CI |"
    assert lines[2].startswith(f"| Standard | Linear | 0.05 | 3 | 1,290 | 63.00 +- {sd:.2f} (tied) | **90.00 +- 0.00** | ")
    assert lines[2].endswith(f" | {76.5 - half / 2:.2f} to {76.5 + half / 2:.2f} |")


def test_the_learning_rate_is_chosen_by_mean_validation_accuracy_over_seeds(tmp_path):
    """LR 0.05 wins validation at two of three seeds, LR 0.01 on the mean over them: 0.01 is chosen."""
    runs = {("linear", 0.05, s): (v, 60, 90) for s, v in enumerate((70, 70, 40))}
    runs |= {("linear", 0.01, s): (65, 50, 90) for s in range(3)}
    runs |= {("lora-r8", 0.05, s): (50, 40, 80) for s in range(3)}
    grid = write_runs(tmp_path, runs, lrs=(0.05, 0.01))
    write_report(tmp_path, grid, EMBEDDED)
    linear = table(tmp_path)["linear"]
    assert (linear["best_lr"], float(linear["val_top1"]), float(linear["target_top1"])) == ("0.01", 65.0, 50.0)


def test_a_best_ahead_at_every_seed_is_bold_though_the_seeds_spread_wider_than_the_gap(tmp_path):
    """Target top-1, paired over seeds: the 1-point gap (d = 1, 1, 1) is separated, although unpaired
    the two rows' intervals (sd 10 each) overlap. Source k-NN: 90 for both at every seed (d = 0, 0,
    0) is no separation: both tied."""
    md = write_report(tmp_path, write_runs(tmp_path, at_lr(SEPARATED)), EMBEDDED)
    rows = table(tmp_path)
    assert float(rows["linear"]["target_top1_ci95_low"]) < float(rows["lora-r8"]["target_top1_ci95_high"])
    assert {k: (r["target_top1_mark"], r["source_knn_mark"], r["mean_mark"]) for k, r in rows.items()} == \
        {"linear": ("best", "tied", "best"), "lora-r8": ("", "tied", "")}
    lines = md.splitlines()
    assert lines[2].startswith("| Standard | Linear | 0.05 | 3 | 1,290 | **70.00 +- 10.00** | 90.00 +- 0.00 (tied) | **80.00 +- 5.00** | ")
    assert lines[3].startswith("| LoRA | LoRA r=8 | 0.05 | 3 | 1,290 | 69.00 +- 10.00 | 90.00 +- 0.00 (tied) | 79.50 +- 5.00 | ")
    assert ("imagenet 20-NN: no row is best. Linear has the highest (90.00); within noise of it, Linear minus each: "
            "LoRA r=8 (0.00, 95% interval 0.00 to 0.00 over 3 seeds).") in md
    assert "cifar100 top-1: no row is best" not in md and "Mean: no row is best" not in md


def test_a_best_within_noise_is_tied_and_the_note_gives_the_paired_interval(tmp_path):
    """Target top-1: linear 60, 62, 67 against LoRA 62, 58, 66; d = -2, 4, 1: mean 1, sd 3, not
    separated. Mean: linear 75, 76, 78.5 against 71, 69, 73; d = 4, 7, 5.5: mean 5.5, sd 1.5, separated."""
    md = write_report(tmp_path, write_runs(tmp_path, at_lr(WITHIN_NOISE)), EMBEDDED)
    rows = table(tmp_path)
    assert {k: (r["target_top1_mark"], r["source_knn_mark"], r["mean_mark"]) for k, r in rows.items()} == \
        {"linear": ("tied", "best", "best"), "lora-r8": ("tied", "", "")}
    half = T975_2 * 3 / math.sqrt(3)
    assert (f"cifar100 top-1: no row is best. Linear has the highest (63.00); within noise of it, Linear minus "
            f"each: LoRA r=8 (1.00, 95% interval {1 - half:.2f} to {1 + half:.2f} over 3 seeds).") in md
    assert "| LoRA | LoRA r=8 | 0.05 | 3 | 1,290 | 62.00 +- 4.00 (tied) | 80.00 +- 0.00 | 71.00 +- 2.00 | " in md
    assert 5.5 - T975_2 * 1.5 / math.sqrt(3) > 0  # the mean's bold, by hand


def test_rows_with_fewer_than_two_seeds_in_common_are_not_separated(tmp_path):
    runs = {k: v for k, v in at_lr(SEPARATED).items() if k[0] == "linear" or k[2] == 0}  # LoRA: seed 0 only
    md = write_report(tmp_path, write_runs(tmp_path, runs), EMBEDDED)
    rows = table(tmp_path)
    assert (rows["lora-r8"]["seeds"], rows["lora-r8"]["target_top1_sd"]) == ("1", "")
    assert (rows["linear"]["target_top1_mark"], rows["lora-r8"]["target_top1_mark"]) == ("tied", "tied")
    assert "LoRA r=8 (fewer than two seeds in common)" in md
    assert "| LoRA | LoRA r=8 | 0.05 | 1 | 1,290 | 59.00 (tied) | 90.00 (tied) | 74.50 (tied) | - |" in md


def test_one_seed_marks_no_row_and_says_why(tmp_path):
    md = write_report(tmp_path, write_runs(tmp_path, at_lr(SEPARATED), seeds=(0,)), EMBEDDED)
    lines = md.splitlines()
    assert lines[0] == "| Group | Strategy | best LR | n | Trainable params | cifar100 top-1 | imagenet 20-NN | Mean |"
    assert lines[2] == "| Standard | Linear | 0.05 | 1 | 1,290 | 60.00 | 90.00 | 75.00 |"
    assert lines[3] == "| LoRA | LoRA r=8 | 0.05 | 1 | 1,290 | 59.00 | 90.00 | 74.50 |"
    assert "**" not in md and "(tied)" not in md
    assert ("One seed per row: no row is marked best, since one run per row cannot tell a difference between "
            "rows from seed noise; give --seeds 0,1,2 to compare them.") in md
    assert all((r["mean_mark"], r["mean_sd"], r["mean_ci95_low"]) == ("", "", "") for r in table(tmp_path).values())


def test_the_figures_draw_each_rows_spread_over_seeds(tmp_path, monkeypatch):
    """figure.png: error bars of +- 1 sd on both axes (linear: source 88, 90, 92, target 60, 70, 80);
    forgetting.png: the mean curve in a +- 1 sd band (seed s's source k-NN at step 10: 80 + 2 s)."""
    runs = {("linear", 0.05, s): (60, 60 + 10 * s, 88 + 2 * s) for s in range(3)}
    runs |= {("lora-r8", 0.05, s): (50, 50, 80) for s in range(3)}
    grid = write_runs(tmp_path, runs)
    for p in grid:
        (tmp_path / p.name / "metrics.csv").write_text(f"step,train_loss,source_knn\n0,,90\n10,2.3,{80 + 2 * p.seed}\n")
    figures, save = {}, engine.plots._save
    monkeypatch.setattr(engine.plots, "_save", lambda fig, out: save(figures.setdefault(out.name, fig), out))
    write_report(tmp_path, grid, EMBEDDED)

    linear, lora = figures["figure.png"].axes[0].containers  # one error bar per row, in table order
    xbar, ybar = (bars.get_segments()[0].tolist() for bars in linear.lines[2])
    assert (xbar, ybar) == ([[88, 70], [92, 70]], [[90, 60], [90, 80]])
    assert [bars.get_segments()[0].tolist() for bars in lora.lines[2]] == [[[80, 50], [80, 50]]] * 2  # sd 0

    ax = figures["forgetting.png"].axes[0]
    assert [line.get_xydata().tolist() for line in ax.get_lines()] == [[[0, 90], [10, 82]]] * 2
    band = ax.collections[0].get_paths()[0].vertices
    assert sorted({y for x, y in band.tolist() if x == 10}) == [80, 84]
    assert sorted({y for x, y in band.tolist() if x == 0}) == [90]
