"""What a user sees: plain lines when the output is piped, bars that never swallow an error, the
loader that ran, unreadable images skipped and named, DeepSpeed's chatter only with --verbose, and
under torchrun one voice."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.processes import free_port
from engine.distributed import LAUNCHER_ENV
from engine.errors import UserError
from engine.run import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--strategy", "linear", "--source", "digits", "--steps", "2", "--eval-every", "1", "--batch-size", "8",
        "data.workers=0", "data.knn_train_limit=100", "data.knn_test_limit=50", "eval.knn_curve_limit=0", "eval.throughput_iters=0"]


def corrupt_mid_file(path: Path) -> None:
    """Cut out the first half of the image data: the JPEG header and end marker stay, so the scan
    passes the file, and the decoders fail on it."""
    data = path.read_bytes()
    scan = data.index(b"\xff\xda")
    path.write_bytes(data[:scan + 2] + data[(scan + len(data)) // 2:])


def image_folder(root: Path, corrupt: bool = True) -> tuple[Path, list[Path]]:
    """root/{train,test}/<class>/*.jpg, 3 classes; one train and one test image corrupted mid-file.
    The train split (15 images once 3 are held out for validation) is smaller than one batch of 16,
    so every step reads all of it."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(80 * "abc".index(c) + 40, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg", quality=90)
    bad = [root / "train" / "b" / "3.jpg", root / "test" / "c" / "1.jpg"] if corrupt else []
    for path in bad:
        corrupt_mid_file(path)
    return root, bad


def run_piped(*args) -> tuple[int, str, str]:
    """main() with stdout and stderr going to pipes (not a terminal), as in `... | tee log`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", params=["torch", pytest.param("dali", marks=pytest.mark.skipif(
    __import__("engine.data", fromlist=["resolve_loader"]).resolve_loader("auto") != "dali",
    reason="NVIDIA DALI is not installed or does not run here"))])
def bad_image_run(request, tmp_path_factory):
    """A run on an image folder holding two JPEGs corrupted mid-file, on each loader, output piped."""
    root = tmp_path_factory.mktemp(f"bad-{request.param}")
    folder, bad = image_folder(root / "data")
    code, out, err = run_piped(*TINY, "--batch-size", "16", "--target", f"imagefolder:{folder}", "--loader", request.param,
                               "--out", str(root / "runs"), "--name", "run")
    return {"code": code, "out": out, "err": err, "bad": bad, "run_dir": root / "runs" / "run",
            "loader": request.param}


def test_jpegs_corrupted_mid_file_are_skipped_named_and_the_run_finishes(bad_image_run):
    r = bad_image_run
    assert r["code"] == 0, r["err"]
    warnings = [line for line in r["out"].splitlines() if line.startswith("warning: skipped unreadable image")]
    assert sorted(w.split()[4] for w in warnings) == sorted(map(str, r["bad"]))
    assert all("of at most 100 (data.max_bad_images)" in w for w in warnings)
    assert json.loads((r["run_dir"] / "results.json").read_text())["target_top1"] >= 0


def test_a_piped_run_prints_one_line_per_eval_and_no_bars(bad_image_run):
    r = bad_image_run
    assert r["err"] == ""  # no bar, no escape sequence, no library chatter
    assert [line.split(":")[0] for line in r["out"].splitlines() if line.startswith("step ")] == ["step 1", "step 2"]
    assert "\r" not in r["out"] and "\x1b" not in r["out"]


def test_the_output_and_results_json_name_the_loader_that_ran(bad_image_run):
    r = bad_image_run
    results = json.loads((r["run_dir"] / "results.json").read_text())
    assert results["loader"] == r["loader"]
    assert f"loader {r['loader']}" in next(line for line in r["out"].splitlines() if line.startswith("target "))
    assert (results["seed"], results["steps"], results["lr"], results["batch_size"]) == (0, 2, 0.05, 16)
    assert results["source"] == "digits" and results["target"].startswith("imagefolder:")
    assert results["torch_version"] and results["timm_version"] and results["deepspeed_version"]


class Terminal(io.StringIO):
    """A stream that says it is a terminal, so progress bars draw on it."""

    def isatty(self) -> bool:
        return True


def test_an_error_under_a_progress_bar_starts_on_a_fresh_line_and_stays_last(tmp_path, monkeypatch):
    """Training stops at step 2 (as on an unreadable image past the limit) while its bar is drawn."""
    from adapters.base import Strategy

    def extra_loss(self, model, step, total_steps):
        if step == 2:
            raise UserError("an unreadable image, more than data.max_bad_images")
        return None

    monkeypatch.setattr(Strategy, "extra_loss", extra_loss)
    terminal = Terminal()
    with contextlib.redirect_stderr(terminal):
        code = main([*TINY, "--steps", "3", "--out", str(tmp_path)])
    assert code == 2
    text = terminal.getvalue()
    assert "\rtrain:  33%" in text  # the bar was drawn
    assert text.endswith("\nerror: an unreadable image, more than data.max_bad_images\n")


def user_env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}, "PYTHONPATH": str(ROOT)}


def test_deepspeeds_log_lines_show_with_verbose(tmp_path):
    """The accelerator line DeepSpeed logs on import: shown with --verbose (hidden without it:
    tests/test_run_folder.py reads a real run's log)."""
    code = "from engine.distributed import init_distributed; init_distributed(verbose=True)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=user_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Setting accelerator to CPU" in proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="no torchrun")
def test_under_torchrun_only_rank_0_prints(tmp_path):
    """Two ranks on a small image folder (the whole run is a few seconds of work after start-up).
    DeepSpeed's shared-memory all-reduce, which only its tensor-parallel inference uses, is not
    compiled (about a minute on first use)."""
    folder, _ = image_folder(tmp_path / "data", corrupt=False)
    extensions = tmp_path / "torch_extensions"
    proc = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "engine.run", *TINY, "--loader", "torch",
                           "--target", f"imagefolder:{folder}", "data.knn_train_limit=20", "data.knn_test_limit=10",
                           "--out", str(tmp_path / "runs"), "--name", "two"], cwd=ROOT,
                          env={**user_env(), "TORCH_EXTENSIONS_DIR": str(extensions)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(extensions.rglob("*shm_comm*"))
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == ["step 1", "step 2"]
    assert sum(line.startswith("linear on embedded") for line in lines) == 1
    assert sum(line.startswith("target imagefolder:") for line in lines) == 1
    assert not any("DeepSpeed" in line or "[WARNING]" in line for line in lines)
