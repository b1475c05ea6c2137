"""`python -m engine.run`, called in-process as a user would: artefacts, golden losses, bad input."""
import csv
import json

import pytest
import torch
from safetensors.torch import save_file

from engine.report import OPTIONAL_KEYS, RESULT_KEYS
from engine.resume import PHASES
from engine.shift import CORRUPTIONS
from engine.run import main

# A few steps on the embedded default, with a small k-NN bank, no forgetting curve (tests/test_curve.py
# has it) and no inference timing (linear_run has it), so each run takes seconds.
QUICK = ["--steps", "4", "--eval-every", "2", "--batch-size", "16", "data.knn_train_limit=300",
         "data.knn_test_limit=100", "data.workers=0", "eval.knn_curve_limit=0", "eval.throughput_iters=0"]
TIMING_KEYS = {"train_img_per_s", "infer_img_per_s", "peak_mem_mb", "wall_s", "time_s"}


def run_cli(tmp_path, name, *args):
    code = main([*QUICK, "--out", str(tmp_path), "--name", name, *args])
    return code, tmp_path / name


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    code, run_dir = run_cli(out, "linear", "--strategy", "linear", "--eval-every", "1", "eval.throughput_iters=2")
    assert code == 0
    return run_dir


def test_run_folder_holds_every_artefact(linear_run):
    for name in ("config.yaml", "results.json", "results.csv", "metrics.csv", "source_knn.json",
                 "checkpoints/best/adapter.safetensors", "checkpoints/last/adapter.safetensors",
                 "adapter/adapter.json"):
        assert (linear_run / name).is_file(), name


def test_saved_config_holds_the_targets_augmentation(linear_run):
    """Digits train without a flip and with crops of at least 35% of the area; config.yaml says so."""
    import yaml

    data = yaml.safe_load((linear_run / "config.yaml").read_text())["data"]
    assert (data["crop_scale_min"], data["hflip"]) == (0.35, 0.0)


def test_results_json_has_exactly_the_contract_keys(linear_run):
    results = json.loads((linear_run / "results.json").read_text())
    assert tuple(k for k in results if k not in OPTIONAL_KEYS) == RESULT_KEYS
    # the embedded target's shift sets (eval.shift=auto: its corrupted digits), per spec and their mean
    assert list(results["shift_top1"]) == [f"corrupt:{c}@3" for c in CORRUPTIONS]
    assert results["target_shift_top1"] == pytest.approx(sum(results["shift_top1"].values()) / 5, abs=1e-3)
    assert results["infer_img_per_s"] > 0
    assert results["forgetting"] == pytest.approx(results["source_knn_before"] - results["source_knn_after"], abs=1e-3)
    assert results["mean"] == pytest.approx((results["target_top1"] + results["source_knn_after"]) / 2, abs=1e-3)
    with open(linear_run / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert list(row) == list(results)


def test_time_s_splits_the_wall_time_by_phase(linear_run):
    """One entry per phase, none negative, summing to wall_s; validation (every step here) is its own,
    and a run without a forgetting curve spends nothing on one."""
    results = json.loads((linear_run / "results.json").read_text())
    time_s = results["time_s"]
    assert list(time_s) == [*PHASES, "other"]
    assert all(seconds >= 0 for seconds in time_s.values())
    assert sum(time_s.values()) == pytest.approx(results["wall_s"], abs=1.0)
    assert min(time_s[p] for p in ("startup", "data", "source_before", "train", "validation", "measure")) > 0
    assert time_s["curve"] == 0


def test_linear_probe_forgets_nothing(linear_run):
    results = json.loads((linear_run / "results.json").read_text())
    assert results["source_knn_after"] == results["source_knn_before"]
    assert results["trainable_params"] == 128 * 10 + 10


# The first losses of the embedded default (linear probe, seed 0). A change here means the data,
# the augmentation, the model, the initialisation or the loop changed: update only on purpose.
GOLDEN_LINEAR_LOSSES = [2.33188, 2.63221, 2.36968, 2.27117]


def test_first_losses_match_the_golden_values(linear_run):
    with open(linear_run / "metrics.csv") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 4
    if GOLDEN_LINEAR_LOSSES is None:
        pytest.fail(f"record the golden losses: {losses}")
    assert losses == pytest.approx(GOLDEN_LINEAR_LOSSES, rel=1e-4)


def test_same_seed_gives_identical_metrics(tmp_path, capsys, linear_run):
    """The same run again, without the inference timing (eval.throughput_iters=0): null, and said so."""
    code, again = run_cli(tmp_path, "again", "--strategy", "linear", "--eval-every", "1")
    assert code == 0
    first = json.loads((linear_run / "results.json").read_text())
    second = json.loads((again / "results.json").read_text())
    assert second["infer_img_per_s"] is None
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out if line.startswith("infer img/s")] == [["infer", "img/s", "not", "measured"]]
    assert [line.split(" (wall ")[-1] for line in out if line.startswith("time s: startup ")] == \
           [f"{second['wall_s']:.1f})"]  # one line under the table
    assert {k: v for k, v in first.items() if k not in TIMING_KEYS} == \
           {k: v for k, v in second.items() if k not in TIMING_KEYS}


@pytest.mark.parametrize("strategy, top_k, expected", [
    ("full", 3, 85_875_556), ("top_k", 3, 21_342_052), ("linear", 3, 76_900)])
def test_dry_run_json_counts_vit_b(capsys, strategy, top_k, expected):
    code = main(["--dry-run", "--json", "--strategy", strategy, "--top-k", str(top_k),
                 "--model", "vit_base_patch16_224", "--num-classes", "100"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["trainable_params"] == expected
    assert out["infer_gflops_per_img"] == pytest.approx(35.13, abs=0.01)
    assert set(out) == {"trainable_params", "total_params", "infer_gflops_per_img"}


@pytest.mark.parametrize("args, message", [
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["train.nope=1"], "unknown config key 'train.nope'"),
    (["--target", "cifar10", "--data-root", "/nonexistent"], "cifar10 not found"),
    (["--target", "imagefolder:/nonexistent"], "does not exist"),
    (["--precision", "fp64"], "must be one of"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code, _ = run_cli(tmp_path, "bad", "--strategy", "linear", *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_weights_that_do_not_fit_are_named(tmp_path, capsys):
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))
    code, _ = run_cli(tmp_path, "bad", "--strategy", "linear", "--weights", str(tmp_path / "w.safetensors"))
    assert code == 2
    assert "does not fit" in capsys.readouterr().err


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_says_the_step(tmp_path, capsys):
    code, run_dir = run_cli(tmp_path, "nan", "--strategy", "full", "--lr", "1e12", "--steps", "6",
                            "--eval-every", "1")
    err = capsys.readouterr().err
    assert code == 3
    assert "loss became nan at step" in err
    step = int(err.split("at step ")[1].split(";")[0])
    last = json.loads((run_dir / "checkpoints/last/trainer.json").read_text())
    assert last["step"] == step - 1
    assert not (run_dir / "results.json").exists()


def test_selective_lora_budget_under_zero3_ends_with_exactly_k_blocks(tmp_path):
    code, run_dir = run_cli(tmp_path, "z3", "--strategy", "selective_lora", "--active-blocks", "2",
                            "--zero-stage", "3")
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["active_blocks"] == 2 and results["total_blocks"] == 12
    from engine.embedded import create_embedded_vit
    from engine.metrics import gflops_per_image
    base = gflops_per_image(create_embedded_vit(pretrained=False, num_classes=10), 32)
    assert results["infer_gflops_per_img"] == pytest.approx(base, abs=1e-4)  # merged: the base model's FLOPs


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_both_loaders_run_the_default(tmp_path, loader):
    code, run_dir = run_cli(tmp_path, loader, "--strategy", "lora", "--loader", loader, "--steps", "2")
    assert code == 0
    assert json.loads((run_dir / "results.json").read_text())["strategy"] == "lora"


def test_an_internal_error_during_training_keeps_its_traceback(tmp_path, monkeypatch):
    """Only bad input becomes one line; a ValueError from deep inside training is a bug, and is raised."""
    import engine.run

    def broken(*args, **kwargs):
        raise ValueError("a shape error deep inside")

    monkeypatch.setattr(engine.run, "train", broken)
    with pytest.raises(ValueError, match="a shape error deep inside"):
        run_cli(tmp_path, "broken", "--strategy", "linear")


def readme_snippet(title: str) -> str:
    """The first python block under the README heading `title`."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index(f"## {title}"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]


def test_the_readmes_timm_snippet_gives_the_runs_target_top1(linear_run, tmp_path, monkeypatch):
    """Export the run, then run the README's lines verbatim over the target's test split."""
    from PIL import Image

    from engine.data import load_domain
    from engine.export import main as export

    assert export([str(linear_run), "--merged", str(tmp_path / "model.safetensors")]) == 0
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(readme_snippet("Load an exported model with timm"), namespace)
    test = load_domain("embedded", role="target").test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one image at a time: a second thread only spin-waits
    try:
        correct = sum(namespace["predict"](Image.fromarray(image)) == label
                      for image, label in zip(test.images, test.labels))
    finally:
        torch.set_num_threads(threads)
    results = json.loads((linear_run / "results.json").read_text())
    assert 100.0 * correct / len(test) == pytest.approx(results["target_top1"], abs=1e-3)
