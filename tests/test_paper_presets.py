"""The paper's Figure 2 and Figure 4 presets: their runs as `--dry-run` lists them, and what each run is."""
from collections import Counter

import pytest

from engine.curve import curve_steps
from engine.sweep import main, plan

SOURCE = "data.source=imagefolder:/data/imagenet"


def _runs(capsys, tmp_path, preset):
    assert main(["--preset", preset, "--dry-run", "--out", str(tmp_path), SOURCE]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return [line for line in lines if line.startswith("[new] ")], lines[-1]


def test_paper_transfer_lists_four_strategies_on_five_sets_at_the_papers_rates(tmp_path, capsys):
    runs, summary = _runs(capsys, tmp_path, "paper-transfer")
    assert summary.startswith("60 runs:")  # 5 sets x (3 strategies x 3 LRs + the linear probe's 3 LRs)
    names = [line.split()[1].rstrip(":") for line in runs]
    assert Counter(n.split("-")[0] for n in names) == {t: 12 for t in ("dtd", "flowers102", "food101", "cifar10",
                                                                        "cifar100")}
    assert {n for n in names if n.startswith("dtd-")} == {
        f"dtd-{row}-lr{lr}-s0" for row in ("full", "lora-r8", "blockexp-p3") for lr in ("0.05", "0.01", "0.005")} | {
        f"dtd-linear-lr{lr}-s0" for lr in ("0.5", "0.05", "0.005")}


def test_paper_transfer_runs_read_their_target_and_group_by_it(tmp_path):
    from engine.config import parse_run_args
    _, preset, grid, _ = plan(["--preset", "paper-transfer", "--out", str(tmp_path), SOURCE])
    for point in grid[::3]:  # each row at one of its rates
        cfg = parse_run_args(point.args, "paper-transfer")
        assert (cfg.data.target, cfg.strategy, cfg.model.name) == (point.name.split("-")[0], point.row.strategy,
                                                                   "vit_base_patch16_224.dino")
    assert [g for g in dict.fromkeys(p.row.group for p in grid)] == ["DTD", "Flowers102", "Food101", "CIFAR-10",
                                                                      "CIFAR-100"]
    assert {p.row.label for p in grid} == {"All", "Linear", "LoRA r=8", "Block Exp. p=3"}


def test_paper_vits_is_the_figure_rows_with_dino_vit_s16_on_cifar100(tmp_path, capsys):
    runs, summary = _runs(capsys, tmp_path, "paper-vits")
    assert summary.startswith("12 runs:")
    assert all("--model vit_small_patch16_224.dino" in line and "--target cifar100" in line for line in runs)


@pytest.mark.parametrize("preset", ["paper", "paper-transfer", "paper-vits"])
def test_paper_presets_measure_the_curve_at_every_one_of_the_first_ten_steps(preset):
    from engine.config import parse_run_args
    point = plan(["--preset", preset, SOURCE])[2][0]
    cfg = parse_run_args(point.args, preset)
    assert curve_steps(cfg.eval.knn_steps, cfg.train.steps)[:12] == [*range(11), 20]
