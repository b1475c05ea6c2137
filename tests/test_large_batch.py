"""Large-batch runs through the engine: a timm optimiser with LR scaling, layer decay and
checkpointing end to end; the refusals; ZeRO-3 with checkpointing on two CPU ranks."""
import csv
import json

import pytest
import yaml

from engine.run import main

QUICK = ["--steps", "2", "--eval-every", "2", "--batch-size", "16", "data.knn_train_limit=100",
         "data.knn_test_limit=50", "data.workers=0", "train.log_every=1", "eval.knn_curve_limit=0", "eval.throughput_iters=0"]


def run_cli(tmp_path, name, *args):
    return main([*QUICK, "--out", str(tmp_path), "--name", name, *args]), tmp_path / name


def test_a_scaled_lamb_run_with_layer_decay_and_checkpointing_records_its_optimizer_and_lr(tmp_path, capsys):
    code, run_dir = run_cli(tmp_path, "lamb", "--strategy", "full", "--optimizer", "lamb", "--zero-stage", "0",
                            "--lr-scale", "linear", "train.base_batch=8", "--layer-decay", "0.75",
                            "--grad-checkpointing", "train.warmup_fraction=0.5")
    assert code == 0
    assert "optimizer lamb, lr 0.1 (linear scaling of 0.05 at batch 8 to batch 16)" in capsys.readouterr().out
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["optimizer"], results["lr_resolved"]) == ("lamb", 0.1)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr_resolved"] == 0.1
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["lr"]) == pytest.approx(0.1)  # warm-up of 1 step (half of 2); the head's group


@pytest.mark.parametrize("args, message", [
    # one process runs ZeRO 1-2 as stage 0, where LAMB is exact (tests/test_run_dry_run.py); stage 3 stays
    (["--strategy", "lora", "--optimizer", "lamb", "--zero-stage", "3"], "ZeRO stage 3 hands the optimiser one flat"),
    (["--strategy", "linear", "--layer-decay", "0.65"], "train.layer_decay has no effect here"),
    (["--strategy", "linear", "--optimizer", "fusedlamb", "--zero-stage", "0"], "cannot run here: CUDA required"),
])
def test_settings_that_cannot_work_are_one_line_before_any_work(tmp_path, capsys, args, message):
    code, run_dir = run_cli(tmp_path, "bad", *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not run_dir.exists()


def test_zero3_with_checkpointing_on_two_cpu_ranks_gives_the_plain_gradients(two_rank_runs):
    """DeepSpeed PR #8130: ZeRO-3 partitioned frozen weights during a non-reentrant recompute and the
    checkpoint saw shape [0]. Here: selective LoRA and block expansion, full gradients compared (on the
    two ranks of the shared launch, tests/conftest.py)."""
    out = two_rank_runs[0] / "zero3-checkpointing.json"
    report = json.loads(out.read_text())
    assert set(report) == {"selective_lora", "block_expansion"}
    for name, r in report.items():
        assert r["max_abs_gradient"] > 0 and r["parameters"] > 0, name
        assert r["max_abs_difference"] <= 1e-6 * r["max_abs_gradient"], name
