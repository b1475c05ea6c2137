"""Durability on one rank: real processes stopped by real signals, then `--resume`; the resumed
run's results.json and metrics.csv equal an uninterrupted run's exactly. A signal before training or
in the final measurement says where it came and leaves a run that `--resume` finishes. A bad
checkpoint, a changed key or a live run folder is refused in one line, and nothing in the run folder
is touched."""
import contextlib
import io
import json
import os
import random
import shutil
import signal
import time

import pytest
import yaml

from bench.processes import metric_rows, results, signal_tree, start, wait_for_row
from durability import DURABLE, run_here, snapshot
from engine.checkpoint import checkpoint_dirs, choose
from engine.errors import UserError
from engine.folder_lock import holder
from engine.report import OPTIONAL_KEYS, RESULT_KEYS
from engine.resume import RunClock
from test_folder_lock import busy_line

# A linear probe on digits (source too: read at once) whose source k-NN and final measurement last a
# few seconds each, long enough for a signal sent on their first line to land inside them; its one
# full checkpoint is the last step's (checkpoint_every beyond the run).
PHASED = ["--strategy", "linear", "--source", "digits", "--steps", "2", "--eval-every", "2", "--checkpoint-every", "3",
          "--batch-size", "8", "--loader", "torch", "data.workers=0", "data.knn_train_limit=200",
          "data.knn_test_limit=100", "eval.batch_size=32", "eval.knn_curve_limit=0", "eval.throughput_iters=0",
          "eval.shift=none"]


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
    assert (run_dir / ".lock").is_file() and holder(run_dir) is None  # the SIGKILLed holder left no lock behind
    assert run_here(["--resume", str(run_dir)]) == 0
    assert results(run_dir) == results(uninterrupted), f"killed after step {step}"
    assert metric_rows(run_dir) == metric_rows(uninterrupted), f"killed after step {step}"


def refused(capsys, run_dir, *args) -> str:
    """Resume `run_dir` expecting a refusal: exit 2, one line, no traceback, nothing touched (but the
    lock file, which names the folder's latest holder)."""
    before = snapshot(run_dir)
    assert run_here(["--resume", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any("Traceback" in line for line in err)
    assert {k: v for k, v in snapshot(run_dir).items() if k != ".lock"} == {k: v for k, v in before.items()
                                                                           if k != ".lock"}
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


def test_a_second_resume_of_a_live_run_refuses_in_one_line_naming_it_and_touches_nothing(killed, uninterrupted,
                                                                                          tmp_path):
    """Two `--resume` of one run: the second finds the first holding the folder (stopped there with
    SIGSTOP, so that it is surely live); the first then finishes as if alone."""
    run_dir = copy_of(killed, tmp_path)
    first = start(["--resume", str(run_dir)], log=tmp_path / "first.log")
    try:
        wait_for_line(first, run_dir / ".lock", f'"pid": {first.pid}')
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            before = snapshot(run_dir)
            second = start(["--resume", str(run_dir)], log=tmp_path / "second.log")
            assert second.wait(600) == 2
            lines = (tmp_path / "second.log").read_text().strip().splitlines()
            assert len(lines) == 1 and busy_line("run folder", run_dir, first.pid, "engine.run").fullmatch(lines[0])
            assert snapshot(run_dir) == before
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert first.wait(600) == 0, (tmp_path / "first.log").read_text()[-2000:]
    finally:
        if first.poll() is None:
            signal_tree(first, signal.SIGKILL)
    assert results(run_dir) == results(uninterrupted)
    assert metric_rows(run_dir) == metric_rows(uninterrupted)  # no step twice


def wait_for_line(proc, path, text: str, timeout: float = 600) -> None:
    """Until `path` (a log) holds `text`; AssertionError if the process ends first."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text()):
        assert proc.poll() is None, f"ended (exit {proc.returncode}) before {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
        time.sleep(0.02)


def last_line(path) -> str:
    return path.read_text().strip().splitlines()[-1]


@pytest.fixture(scope="module")
def phased(tmp_path_factory):
    """One run stopped twice outside training's steps, each time continued with the command it printed:
    SIGTERM in the untouched backbone's source k-NN, then SIGINT in the final measurement, then to the
    end (in this process)."""
    out = tmp_path_factory.mktemp("phased")
    run_dir = out / "run"
    first = start([*PHASED, "--out", str(out), "--name", "run"], log=out / "1.log")
    wait_for_line(first, out / "1.log", f"run folder {run_dir}")
    codes = [signal_tree(first, signal.SIGTERM)]
    assert codes[0] == 143, (out / "1.log").read_text()  # stopped, not run to its end: its log says why not
    files_then = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    command = last_line(out / "1.log").split("resume with: python -m engine.run ")[-1].split()
    second = start(command, log=out / "2.log")
    wait_for_line(second, out / "2.log", "restored: measuring it")
    codes.append(signal_tree(second, signal.SIGINT))
    assert codes[1] == 130, (out / "2.log").read_text()
    metrics_then = (run_dir / "metrics.csv").read_bytes()
    facts_then = json.loads((checkpoint_dirs(run_dir)[0] / "manifest.json").read_text())["facts"]
    third = io.StringIO()
    with contextlib.redirect_stdout(third):
        codes.append(run_here(last_line(out / "2.log").split("resume with: python -m engine.run ")[-1].split()))
    return {"run_dir": run_dir, "codes": codes, "files_then": files_then, "metrics_then": metrics_then,
            "facts_then": facts_then, "logs": [(out / "1.log").read_text(), (out / "2.log").read_text(),
                                               third.getvalue()]}


def test_a_signal_in_the_source_knn_says_so_exits_143_and_resume_trains_from_step_0(phased):
    run_dir = phased["run_dir"]
    assert phased["codes"][0] == 143
    assert phased["logs"][0].strip().splitlines()[-1] == (
        f"stopped by SIGTERM during the untouched backbone's source k-NN; resume with: python -m engine.run "
        f"--resume {run_dir}")
    assert phased["files_then"] == [".lock", "config.yaml"]  # nothing finished, nothing else written
    assert f"resuming {run_dir}: it wrote no full checkpoint; training starts again from step 0\n" in phased["logs"][1]


def test_a_signal_in_the_final_measurement_says_so_exits_130_and_resume_measures_without_training(phased):
    run_dir = phased["run_dir"]
    assert phased["codes"][1:] == [130, 0]
    assert phased["logs"][1].strip().splitlines()[-1] == (
        f"stopped by SIGINT during the final measurement (training had finished); resume with: python -m "
        f"engine.run --resume {run_dir}")
    third = phased["logs"][2]
    assert f"resuming {run_dir}: training finished at step 2" in third and "step 2:" not in third
    assert (run_dir / "metrics.csv").read_bytes() == phased["metrics_then"]
    results = json.loads((run_dir / "results.json").read_text())
    assert tuple(k for k in results if k not in OPTIONAL_KEYS) == RESULT_KEYS


def test_a_resumed_runs_wall_time_is_that_of_its_processes(phased):
    """The process stopped in the k-NN finished nothing; the one that trained counts to its last
    checkpoint, the last one to its end."""
    results = json.loads((phased["run_dir"] / "results.json").read_text())
    assert phased["facts_then"]["processes"] == 1 and results["processes"] == 2
    assert results["wall_s"] > phased["facts_then"]["wall_s"] > 0
    clock = RunClock()
    clock.carry({"wall_s": 12.5, "processes": 2})
    assert clock.processes == 3 and clock.wall_s() >= 12.5
    clock.carry({})
    assert clock.processes == 1


def test_a_resumed_runs_time_s_sums_its_processes(phased):
    """The process that trained measured the untouched backbone and validated, up to its checkpoint;
    the last one did neither, and restored and measured: each phase is their sum, the whole wall_s."""
    results = json.loads((phased["run_dir"] / "results.json").read_text())
    then, time_s = phased["facts_then"]["time_s"], results["time_s"]
    assert sum(time_s.values()) == pytest.approx(results["wall_s"], abs=1.0)
    assert sum(then.values()) == pytest.approx(phased["facts_then"]["wall_s"], abs=1.0)
    for phase in ("source_before", "validation"):
        assert time_s[phase] == pytest.approx(then[phase], abs=2e-3) and then[phase] > 0, phase
    assert then["restore"] == then["measure"] == 0 < time_s["restore"] < time_s["measure"]
    assert time_s["startup"] > then["startup"] > 0
