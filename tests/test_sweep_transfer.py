"""The report of a sweep over several targets (the paper's Figure 2, `--preset paper-transfer`) and
Block Expansion against p at each learning rate (its Figure 3): a table per data set with marks only
within it, the means across data sets, transfer.png and blockexp_lr.png."""
import csv
import json

import pytest
import yaml

from engine.presets import EMBEDDED, PAPER_TRANSFER
from engine.sweep import build_grid, main
from engine.sweep_report import blockexp_points, select, write_report

from data.data_fixtures import write_good_folder
from test_sweep import TINY
from test_transfer_sets import write_dtd, write_food


def finished_run(run_dir, point, target, source, val, before=90.0, blocks=3):
    """A finished run's contract files, its config naming the point's target and its blocks."""
    data_target = point.row.args[point.row.args.index("--target") + 1] if "--target" in point.row.args else "embedded"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({
        "strategy": point.row.strategy, "trainable_params": 1000, "target_top1": target, "source_knn_before": before,
        "source_knn_after": source, "forgetting": before - source, "mean": (target + source) / 2}))
    (run_dir / "source_knn.json").write_text(json.dumps({"best_val_top1": val}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "data": {"target": data_target, "source": "imagefolder:/data/imagenet"}, "eval": {"knn_report_k": 20},
        "adapter": {"lora_rank": 8, "blocks": blocks}}))
    (run_dir / "metrics.csv").write_text("step,train_loss,source_knn\n0,,90\n1,2.3,80\n")


# per (row, seed): target top-1, source k-NN. On DTD All is ahead of Linear on both, seed by seed; on
# Food101 Linear is ahead: each table has its own best, which one table over all four rows would not show.
FIGURES = {("dtd-full", 0): (70.0, 80.0), ("dtd-full", 1): (71.0, 81.0), ("dtd-full", 2): (72.0, 82.0),
           ("dtd-linear", 0): (50.0, 60.0), ("dtd-linear", 1): (50.5, 60.5), ("dtd-linear", 2): (51.5, 61.5),
           ("food101-full", 0): (10.0, 30.0), ("food101-full", 1): (10.5, 30.5), ("food101-full", 2): (11.5, 31.5),
           ("food101-linear", 0): (40.0, 50.0), ("food101-linear", 1): (41.0, 51.0),
           ("food101-linear", 2): (42.0, 52.0)}


@pytest.fixture
def transfer_sweep(tmp_path):
    rows = tuple(PAPER_TRANSFER.row(k) for k in ("dtd-full", "dtd-linear", "food101-full", "food101-linear"))
    grid = build_grid(rows, [0, 1, 2], lrs=(0.05,))
    for p in grid:
        target, source = FIGURES[p.row.key, p.seed]
        finished_run(tmp_path / p.name, p, target, source, val=target)
    return tmp_path, grid, write_report(tmp_path, grid, PAPER_TRANSFER)


def test_each_data_set_gets_its_own_table_with_marks_only_within_it(transfer_sweep):
    _, _, table = transfer_sweep
    dtd, food = table.split("### DTD\n")[1].split("### Food101\n")
    food = food.split("### Mean")[0]
    assert "| dtd top-1 | imagenet 20-NN |" in dtd and "| food101 top-1 | imagenet 20-NN |" in food
    assert "| DTD | All | 0.05 | 3 | 1,000 | **71.00 +- 1.00** | **81.00 +- 1.00** |" in dtd
    assert "|  | Linear | 0.05 | 3 | 1,000 | 50.67 +- 0.76 | 60.67 +- 0.76 |" in dtd
    assert "| Food101 | All | 0.05 | 3 | 1,000 | 10.67 +- 0.76 | 30.67 +- 0.76 |" in food
    assert "|  | Linear | 0.05 | 3 | 1,000 | **41.00 +- 1.00** | **51.00 +- 1.00** |" in food


def test_the_means_across_data_sets_are_each_rows_mean_averaged_over_the_sets(transfer_sweep):
    folder, _, table = transfer_sweep
    means = table.split("### Mean across the 2 data sets\n")[1]
    assert "| Strategy | sets | target top-1 | imagenet 20-NN | Mean | Forgetting |" in means
    # All: (71 + 10.667) / 2 = 40.83 target, (81 + 30.667) / 2 = 55.83 source, forgetting 90 - 55.83
    assert "| All | 2 of 2 | 40.83 | 55.83 | 48.33 | 34.17 |" in means
    assert "| Linear | 2 of 2 | 45.83 | 55.83 | 50.83 | 34.17 |" in means
    with open(folder / "means.csv") as f:
        read = list(csv.DictReader(f))
    assert [(r["label"], r["sets"], r["of"], r["target_top1"]) for r in read] == [("All", "2", "2", "40.8333"),
                                                                                  ("Linear", "2", "2", "45.8333")]
    assert "Target top-1 on each data set's test split" in table


def test_the_transfer_figure_and_every_curve_are_drawn(transfer_sweep):
    folder, grid, _ = transfer_sweep
    assert (folder / "transfer.png").stat().st_size > 0 and (folder / "forgetting.png").stat().st_size > 0
    assert not (folder / "blockexp_lr.png").exists()  # no Block Expansion run


def test_one_target_keeps_one_table_and_no_transfer_figure(tmp_path):
    rows = (EMBEDDED.row("full"), EMBEDDED.row("linear"))
    grid = build_grid(rows, [0], lrs=(0.05,))
    for p in grid:
        finished_run(tmp_path / p.name, p, 50.0, 60.0, val=50.0)
    table = write_report(tmp_path, grid, EMBEDDED)
    assert "###" not in table and table.startswith("| Group | Strategy |")
    assert not (tmp_path / "transfer.png").exists() and not (tmp_path / "means.csv").exists()


def test_block_expansion_against_p_at_each_learning_rate(tmp_path):
    rows = tuple(EMBEDDED.row(f"blockexp-p{p}") for p in (1, 2))
    grid = build_grid(rows, [0, 1], lrs=(0.05, 0.005))
    for point in grid:
        p = int(point.row.key[-1])
        high = point.lr == 0.05
        target = 60.0 + 2 * p + (5 if high else 0) + point.seed
        source = 85.0 - (8 if high else 1) * p - point.seed
        finished_run(tmp_path / point.name, point, target, source, val=target, blocks=p)
    write_report(tmp_path, grid, EMBEDDED)
    assert (tmp_path / "blockexp_lr.png").stat().st_size > 0
    rows_, finished = select(grid, tmp_path)
    points = blockexp_points(rows_, finished)
    assert list(points) == [""]  # one target: one row of panels
    assert {lr: sorted(v) for lr, v in points[""].items()} == {
        0.05: [(1, 67.5, 76.5), (2, 69.5, 68.5)], 0.005: [(1, 62.5, 83.5), (2, 64.5, 82.5)]}


def test_one_learning_rate_draws_no_blockexp_figure(tmp_path):
    grid = build_grid((EMBEDDED.row("blockexp-p1"), EMBEDDED.row("blockexp-p2")), [0], lrs=(0.05,))
    for point in grid:
        finished_run(tmp_path / point.name, point, 60.0, 80.0, val=60.0, blocks=int(point.row.key[-1]))
    write_report(tmp_path, grid, EMBEDDED)
    assert not (tmp_path / "blockexp_lr.png").exists()


def test_the_paper_transfer_preset_runs_on_miniature_layouts_with_the_embedded_backbone(tmp_path, capsys):
    """The preset's own machinery end to end: its rows on DTD and Food101 as written in miniature, an
    ImageNet-style source folder, the embedded backbone; two runs of two steps, each on its data set's
    splits."""
    write_dtd(tmp_path / "data")
    write_food(tmp_path / "data")
    for split in ("train", "val"):
        write_good_folder(tmp_path / "imagenet" / split, seed=len(split))
    code = main(["--preset", "paper-transfer", "--rows", "dtd-linear,food101-linear", "--lrs", "0.05",
                 "--out", str(tmp_path / "sweep"), "--data-root", str(tmp_path / "data"), "--model", "embedded",
                 f"data.source=imagefolder:{tmp_path / 'imagenet'}", *TINY, "--batch-size", "4",
                 "eval.knn_steps=0,2", "train.warmup_steps=0"])
    assert code == 0
    table = (tmp_path / "sweep" / "table.md").read_text()
    assert "### DTD" in table and "### Food101" in table and "| Linear | 2 of 2 |" in table
    assert "| dtd top-1 |" in table and "| food101 top-1 |" in table
    assert (tmp_path / "sweep" / "transfer.png").stat().st_size > 0
    for name, target in (("dtd-linear-lr0.05-s0", "dtd"), ("food101-linear-lr0.05-s0", "food101")):
        assert yaml.safe_load((tmp_path / "sweep" / name / "config.yaml").read_text())["data"]["target"] == target
    # DTD selects its checkpoint on its official val split; Food101 on 10% of train held out (one a class here)
    assert "target dtd: 9 train, 6 val, 3 test images" in (tmp_path / "sweep" / "logs" / "dtd-linear-lr0.05-s0.log"
                                                           ).read_text()
    assert "target food101: 6 train, 3 val, 3 test images" in (
        tmp_path / "sweep" / "logs" / "food101-linear-lr0.05-s0.log").read_text()


def test_paper_vits_prints_the_papers_figure_4_beside_ours(tmp_path):
    from engine.presets import PAPER_VITS
    grid = build_grid(PAPER_VITS.rows, [0], lrs=(0.05,))
    for p in grid:
        finished_run(tmp_path / p.name, p, 60.0, 40.0 if p.row.strategy == "full" else 80.0, val=60.0)
    lines = write_report(tmp_path, grid, PAPER_VITS).splitlines()
    assert lines[0].endswith("| paper: params | paper: CIFAR-100 | paper: IN-1K | paper: Mean |")
    assert lines[2] == "| CIFAR-100 | All | 0.05 | 1 | 1,000 | 60.00 | 40.00 | 50.00 |  | - | 15.77 | - |"
    assert lines[3].endswith("| 60.00 | 80.00 | 70.00 |  |  |  |  |")
    assert "The paper's columns are its Figure 4 (it prints full fine-tuning's ImageNet-1K k-NN alone)" in \
        "\n".join(lines)
