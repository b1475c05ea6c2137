"""`python -m engine.sweep`: the grid and its commands, the table's choice of learning rate (validation,
never test) and layout, an interrupted sweep continuing (a real SIGKILL), and the submitit launcher."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.presets import PAPER
from engine.config import parse_run_args, resolved_for_target, save_yaml
from engine.sweep import build_grid, main, plan
from engine.sweep_report import write_report

ROOT = Path(__file__).resolve().parents[1]
# Each run: 2 steps of the embedded default, small k-NN banks, no curve.
TINY = ["--steps", "2", "--eval-every", "2", "--batch-size", "16", "data.knn_train_limit=100",
        "data.knn_test_limit=50", "data.workers=0", "eval.knn_curve_limit=0", "eval.throughput_iters=0"]


def dry_run(capsys, *args):
    assert main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_the_embedded_preset_is_the_papers_rows_at_the_papers_learning_rates(capsys):
    lines = dry_run(capsys, "--preset", "embedded", "--out", "sweep")
    assert lines[-1] == "45 runs: 0 done, 0 diverged, 0 partial, 45 new"
    names = [line.split()[1].rstrip(":") for line in lines[:-1]]
    assert names[:6] == ["full-lr0.05-s0", "full-lr0.01-s0", "full-lr0.005-s0",
                         "full-ld065-lr0.05-s0", "full-ld065-lr0.01-s0", "full-ld065-lr0.005-s0"]
    assert {"linear-lr0.5-s0", "linear-lr0.05-s0", "linear-lr0.005-s0"} <= set(names)
    budget = next(line for line in lines if line.startswith("[new] selective-5pct-lr0.01-s0"))
    assert budget.endswith("-m engine.run --strategy selective_lora --active-fraction 0.05 --lr 0.01 --seed 0 "
                           "--out sweep --name selective-5pct-lr0.01-s0")


def test_quick_is_the_six_strategies_at_one_learning_rate(capsys):
    lines = dry_run(capsys, "--preset", "embedded", "--quick")
    strategies = [line.split("--strategy ")[1].split()[0] for line in lines[:-1]]
    assert strategies == ["full", "top_k", "linear", "lora", "block_expansion", "selective_lora"]
    assert all("--lr 0.05 " in line for line in lines[:-1])


@pytest.mark.parametrize("seeds, expected", [
    ("3", [0, 1, 2]), ("0-2", [0, 1, 2]), ("0,1,2", [0, 1, 2]), ("1", [0]), ("5-5", [5]), ("5,", [5]),
    ("4,0-1", [4, 0, 1])])
def test_seeds_take_a_count_a_range_or_a_list(capsys, seeds, expected):
    lines = dry_run(capsys, "--preset", "embedded", "--quick", "--rows", "full", "--seeds", seeds)
    assert [line.split()[1].rstrip(":") for line in lines[:-1]] == [f"full-lr0.05-s{s}" for s in expected]


def test_the_paper_preset_runs_the_papers_recipe_on_imagenet(capsys):
    lines = dry_run(capsys, "--preset", "paper", "--weights", "dino_vitbase16_pretrain.pth",
                    "data.source=imagefolder:/data/imagenet")
    assert lines[-1].startswith("45 runs")
    assert all(f"--config {ROOT / 'configs' / 'paper_cifar100.yaml'}" in line for line in lines[:-1])


@pytest.mark.parametrize("args, message", [
    (["--preset", "paper"], "data.source=imagefolder:DIR"),
    (["--preset", "embedded", "--lr", "0.1"], "--lr is set by the sweep"),
    (["--preset", "embedded", "train.lr=0.1"], "train.lr is set by the sweep"),
    (["--strategies", "lora,nope", "--lrs", "0.1"], "unknown strategy 'nope'"),
    (["--preset", "embedded", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--preset", "embedded", "train.nope=1"], "unknown config key 'train.nope'"),
    (["--preset", "embedded", "--rows", "lora-r99"], "unknown row 'lora-r99'"),
    (["--preset", "embedded", "--seeds", "0"], "--seeds 0 runs no seed"),
    (["--preset", "embedded", "--seeds", "2-0"], "range '2-0' runs backwards"),
    (["--preset", "embedded", "--seeds", "0-2,x"], "'x' is not a seed or a range"),
    (["--preset", "embedded", "--seeds", "1.5"], "'1.5' is not a seed or a range"),
    (["--preset", "embedded", "--seeds", "0-"], "'0-' is not a seed or a range"),
    (["--preset", "embedded", "--seeds", "0-2,2"], "seed 2 is given twice"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def fake_run(run_dir, strategy, val, target, source, params, before=90.0):
    """A finished run's contract files, as engine.run writes them."""
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({
        "strategy": strategy, "trainable_params": params, "target_top1": target, "source_knn_before": before,
        "source_knn_after": source, "forgetting": before - source, "mean": (target + source) / 2}))
    (run_dir / "source_knn.json").write_text(json.dumps({"best_val_top1": val}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "data": {"target": "cifar100", "source": "imagefolder:/data/imagenet"},
        "eval": {"knn_report_k": 20}, "adapter": {"lora_rank": 8}}))
    (run_dir / "metrics.csv").write_text("step,train_loss,source_knn\n0,,90\n1,2.3,80\n")


def test_the_table_picks_each_rows_learning_rate_by_validation_and_bolds_no_mean_with_one_seed(tmp_path):
    rows = (PAPER.row("linear"), PAPER.row("lora-r8"))
    grid = build_grid(rows, [0], lrs=(0.05, 0.01))
    runs = {"linear-lr0.05-s0": (70.0, 60.0, 90.0), "linear-lr0.01-s0": (60.0, 65.0, 90.0),  # test prefers 0.01
            "lora-r8-lr0.05-s0": (75.0, 80.0, 70.0), "lora-r8-lr0.01-s0": (80.0, 78.0, 70.0)}
    for p in grid:
        val, target, source = runs[p.name]
        fake_run(tmp_path / p.name, p.row.strategy, val, target, source, 1000 if p.row.strategy == "linear" else 5000)
    table = write_report(tmp_path, grid, PAPER)
    lines = table.splitlines()
    assert lines[0] == ("| Group | Strategy | best LR | n | Trainable params | cifar100 top-1 | imagenet 20-NN | Mean | "
                        "paper: params | paper: CIFAR-100 | paper: IN-1K | paper: Mean |")
    # one seed: no row of ours is bold (the paper's own column keeps its bold)
    assert lines[2] == "| Standard | Linear | 0.05 | 1 | 1,000 | 60.00 | 90.00 | 75.00 | 76.9 K | 80.57 | 76.11 | **78.34** |"
    assert lines[3] == "| LoRA | LoRA r=8 | 0.01 | 1 | 5,000 | 78.00 | 70.00 | 74.00 | 448 K | 88.27 | 65.99 | 77.13 |"
    assert "include the 76.9 K classifier twice" in table
    with open(tmp_path / "table.csv") as f:
        chosen = {r["row"]: r["best_lr"] for r in csv.DictReader(f)}
    assert chosen == {"linear": "0.05", "lora-r8": "0.01"}
    for figure in ("figure.png", "forgetting.png"):
        assert (tmp_path / figure).stat().st_size > 0


def sweep_args(out, *extra):
    return ["--strategies", "linear,lora", "--lrs", "0.05", "--out", str(out), *TINY, *extra]


def test_an_interrupted_sweep_continues_without_redoing_finished_runs(tmp_path, capsys, monkeypatch):
    """The first run is finished (its contract files, as engine.run leaves them); the sweep is killed
    (SIGKILL) while the second run trains; run again (in this process: its runs are processes either
    way), it keeps the first run and restarts the second."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    first, second = tmp_path / "linear-lr0.05-s0", tmp_path / "lora-lr0.05-s0"
    fake_run(first, "linear", 50.0, 55.0, 88.0, 1290)
    point = next(p for p in plan(sweep_args(tmp_path))[2] if p.name == first.name)
    cfg = parse_run_args([*point.args, "--out", str(tmp_path), "--name", first.name], "test")
    save_yaml(resolved_for_target(cfg, 0.35, 0.0), first / "config.yaml")  # as engine.run resolves it for digits
    sweep = subprocess.Popen([sys.executable, "-m", "engine.sweep", *sweep_args(tmp_path)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while not (second / "config.yaml").exists() and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sweep.poll() is None, sweep.stdout.read().decode()[-2000:]
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    finished_at = (first / "results.json").stat().st_mtime_ns
    for _ in range(1200):  # the run stops with the sweep (PR_SET_PDEATHSIG's SIGTERM): wait for it to be gone
        if not any(f"--name {second.name}" in " ".join(open(f"/proc/{pid}/cmdline").read().split("\0"))
                   for pid in os.listdir("/proc") if pid.isdigit() and os.path.exists(f"/proc/{pid}/cmdline")):
            break
        time.sleep(0.1)
    assert not (second / "results.json").exists()

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(ROOT)
    code = main(sweep_args(tmp_path))
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "2 runs, 1 finished before, 1 to run" in out
    assert "stale" not in out  # the killed run's own config.yaml is what the sweep would run now
    assert (first / "results.json").stat().st_mtime_ns == finished_at
    assert json.loads((second / "results.json").read_text())["strategy"] == "lora"
    assert "| LoRA | lora | 0.05 |" in (tmp_path / "table.md").read_text()


def test_the_submitit_launcher_runs_the_grid_through_submitits_local_executor(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    polls, as_completed = [], submitit.helpers.as_completed
    monkeypatch.setattr(submitit.helpers, "as_completed",
                        lambda jobs, **kw: polls.append(kw.get("poll_frequency", 10)) or as_completed(jobs, **kw))
    code = main(["--strategies", "linear", "--lrs", "0.05", "--out", str(tmp_path), "--launcher", "submitit",
                 "--cluster", "local", "--gpus", "0", *TINY])
    assert code == 0
    assert json.loads((tmp_path / "linear-lr0.05-s0" / "results.json").read_text())["strategy"] == "linear"
    assert list((tmp_path / "submitit").glob("*_log.out"))  # submitit's own job logs
    assert "| Standard | linear | 0.05 |" in (tmp_path / "table.md").read_text()
    assert polls == [0.5]  # a local job's end is seen at once, not at submitit's 10 s SLURM cadence
