"""Durability on one rank: real processes stopped by real signals, then `--resume`; the resumed
run's results.json and metrics.csv equal an uninterrupted run's exactly. A bad checkpoint or a
changed key is refused in one line, and nothing in the run folder is touched."""
import json
import random
import shutil
import signal

import pytest
import yaml

from bench.processes import metric_rows, results, signal_tree, start, wait_for_row
from durability import DURABLE, run_here, snapshot
from engine.checkpoint import checkpoint_dirs, choose
from engine.errors import UserError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("durable")


@pytest.fixture(scope="module")
def uninterrupted(durable_reference):
    return durable_reference


@pytest.fixture(scope="module")
def stopped(runs):
    """A run stopped with SIGTERM after step 2 (exit code, log): its own process, a real signal."""
    proc = start([*DURABLE, "--out", str(runs), "--name", "run"], log=runs / "term.log")
    wait_for_row(proc, runs / "run" / "metrics.csv", 2)
    code = signal_tree(proc, signal.SIGTERM)
    return runs / "run", code, (runs / "term.log").read_text()


@pytest.fixture(scope="module")
def killed(runs, stopped):
    """The stopped run resumed in a new process and SIGKILLed there at a random later step (after its
    first full checkpoint, or while writing one), as it was left; then a copy of that state."""
    run_dir, _, _ = stopped
    step = random.choice([4, 5])
    proc = start(["--resume", str(run_dir)], log=runs / "killed.log")
    wait_for_row(proc, run_dir / "metrics.csv", step)
    assert signal_tree(proc, signal.SIGKILL) == -signal.SIGKILL
    kept = runs / "killed-as-left"
    shutil.copytree(run_dir, kept)
    return run_dir, kept, step


def test_sigterm_finishes_the_step_writes_a_checkpoint_says_how_to_resume_and_exits_143(stopped):
    run_dir, code, log = stopped
    assert code == 143
    assert f"resume with: python -m engine.run --resume {run_dir}" in log
    saved = checkpoint_dirs(run_dir)[0]
    step = int(saved.name.split("-")[1])
    assert step >= 2 and (saved / "manifest.json").is_file()
    assert f"stopped by SIGTERM after step {step}" in log


def test_sigterm_then_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_results(killed, uninterrupted):
    run_dir, _, step = killed
    assert run_here(["--resume", str(run_dir)]) == 0
    assert results(run_dir) == results(uninterrupted), f"killed after step {step}"
    assert metric_rows(run_dir) == metric_rows(uninterrupted), f"killed after step {step}"


def refused(capsys, run_dir, *args) -> str:
    """Resume `run_dir` expecting a refusal: exit 2, one line, no traceback, nothing touched."""
    before = snapshot(run_dir)
    assert run_here(["--resume", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any("Traceback" in line for line in err)
    assert snapshot(run_dir) == before
    return err[-1]


def copy_of(killed, tmp_path):
    return shutil.copytree(killed[1], tmp_path / "run")


def test_a_truncated_checkpoint_is_refused_naming_the_file(killed, tmp_path, capsys):
    run_dir = copy_of(killed, tmp_path)
    victim = checkpoint_dirs(run_dir)[0] / "deepspeed" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    line = refused(capsys, run_dir)
    assert str(victim) in line and "truncated" in line


def test_a_checkpoint_of_another_strategy_is_refused(killed, tmp_path, capsys):
    """The folder's config says lora; its checkpoints were written by selective LoRA."""
    run_dir = copy_of(killed, tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["strategy"], saved["adapter"]["active_blocks"] = "lora", None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    line = refused(capsys, run_dir)
    assert "was written for strategy 'selective_lora', this run has 'lora'" in line


def test_a_changed_key_is_refused_listing_them(killed, tmp_path, capsys):
    run_dir = copy_of(killed, tmp_path)
    line = refused(capsys, run_dir, "--steps", "12", "--seed", "3", "data.workers=1")
    assert "train.steps (6 -> 12)" in line and "seed (0 -> 3)" in line and "workers" not in line


def test_resume_falls_back_to_the_previous_complete_checkpoint(killed, tmp_path, capsys):
    """A corrupt newest checkpoint is named and skipped; the one before it is chosen."""
    run_dir = copy_of(killed, tmp_path)
    newest = checkpoint_dirs(run_dir)[0]
    older = shutil.copytree(newest, newest.with_name("step-00000001"))  # a second complete one, by its manifest
    rank_file = newest / "rank-0.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rank_file.write_bytes(bytes(data))
    manifest = json.loads((older / "manifest.json").read_text())
    notes = []
    chosen, _ = choose(run_dir, manifest["identity"], say=notes.append)
    assert chosen == older
    assert notes == [f"note: rejected checkpoint: {rank_file} does not match its checksum (corrupt)",
                     f"note: falling back to the previous complete checkpoint, {older}"]


def test_a_checkpoint_of_another_world_size_names_the_universal_conversion(killed):
    path = checkpoint_dirs(killed[1])[0]
    manifest = json.loads((path / "manifest.json").read_text())
    other = {**manifest["identity"], "world": 2}
    with pytest.raises(UserError, match=r"written by 1 rank\(s\) and this run has 2.*universal checkpoint"):
        choose(killed[1], other)
