"""The forgetting curve: log-spaced steps, rows in metrics.csv, a figure, and no host read outside its points."""
import csv
import json

import pytest
import torch

from engine.curve import curve_steps, log_steps
from engine.run import main

from host_reads import spy_on_host_reads
from test_run import QUICK


def test_default_steps_are_log_spaced_up_to_the_last_step():
    assert log_steps(150) == [0, 1, 2, 5, 10, 20, 50, 100, 150]
    assert log_steps(100) == [0, 1, 2, 5, 10, 20, 50, 100]
    assert log_steps(1) == [0, 1]
    assert log_steps(10_000)[-3:] == [2000, 5000, 10_000]
    assert curve_steps(None, 7) == [0, 1, 2, 5, 7]
    assert curve_steps([5, 0, 5, 3], 7) == [0, 3, 5]


@pytest.mark.parametrize("steps, message", [("0,9", "must lie in 0..train.steps"), ("-1", "must lie in")])
def test_curve_steps_outside_the_run_are_refused(tmp_path, capsys, steps, message):
    code = main([*QUICK, "--strategy", "linear", "--knn-steps", steps, "--out", str(tmp_path), "--name", "bad"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def curve_run_under_zero3(tmp_path_factory):
    """LoRA under ZeRO-3 (the curve reads parameters inside `gathered`), 6 steps, curve at its default steps,
    with a spy on every host read the project's code makes during training."""
    out = tmp_path_factory.mktemp("curve")
    linear = torch.nn.functional.linear
    patch = pytest.MonkeyPatch()
    reads = spy_on_host_reads(patch)
    try:
        code = main([*QUICK, "eval.knn_curve_limit=60", "--strategy", "lora", "--zero-stage", "3", "--steps", "6",
                     "--eval-every", "3", "--out", str(out), "--name", "z3"])
    finally:
        patch.undo()
    assert code == 0
    # DeepSpeed's ZeRO-3 replaces torch's linear process-wide; the run puts it back (tests/test_resume.py
    # compares a run in this process, made after this one, with one in a fresh process)
    assert torch.nn.functional.linear is linear
    with open(out / "z3" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return out / "z3", rows, {step for step, _, _ in reads}


def test_curve_points_are_rows_of_metrics_csv(curve_run_under_zero3):
    run_dir, rows, _ = curve_run_under_zero3
    assert [(int(r["step"]), r["source_knn"] != "", r["val_top1"] != "") for r in rows] == [
        (0, True, False), (1, True, False), (2, True, False), (3, False, True), (5, True, False), (6, True, True)]
    assert rows[0]["train_loss"] == ""  # step 0: the untouched backbone, before any step
    assert all(0 <= float(r["source_knn"]) <= 100 for r in rows if r["source_knn"])
    info = json.loads((run_dir / "source_knn.json").read_text())["curve"]
    assert (info["steps"], info["bank"], info["queries"]) == ([0, 1, 2, 5, 6], 60, 60)
    assert (run_dir / "forgetting.png").stat().st_size > 0


def test_a_train_step_reads_the_device_only_at_log_eval_and_curve_points(curve_run_under_zero3):
    _, _, reads = curve_run_under_zero3
    assert reads <= {1, 2, 3, 5, 6}, reads
    assert {1, 2, 5} <= reads  # the spy sees the curve points' reads


def test_a_metrics_file_written_before_a_column_was_added_keeps_its_own_columns(tmp_path):
    """A run resumed by a version whose metrics.csv has one column more (zeroshot) appends rows in the
    file's own header, so every row stays aligned with it."""
    import csv
    from engine.train import _append_csv
    path = tmp_path / "metrics.csv"
    old = ["step", "train_loss", "lr", "skipped_steps", "train_img_per_s", "elapsed_s", "val_top1", "source_knn"]
    path.write_text(",".join(old) + "\r\n5,1.5,0.01,0,10.0,2.0,,80.5\r\n")
    _append_csv(path, {"step": 6, "train_loss": 1.25, "lr": 0.01, "skipped_steps": 0, "train_img_per_s": 11.0,
                       "elapsed_s": 2.5, "val_top1": None, "source_knn": 79.0, "zeroshot": 60.0})
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == old and all(len(r) == len(old) for r in rows)
    assert rows[2] == ["6", "1.25", "0.01", "0", "11", "2.5", "", "79"]
