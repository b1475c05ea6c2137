"""One live owner per folder (engine.folder_lock), with real processes: a folder another live process
holds is refused in one line naming it (pid, host, since when) and left exactly as it was; two sweeps
on one folder never both run; the lock dies with its process, kill -9 included."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.processes import read_rows, start
from engine.errors import UserError
from engine.folder_lock import FolderBusy, FolderLock, holder
from engine.presets import default_rows
from engine.run import main
from engine.sweep import build_grid, launch_local, restart_command

ROOT = Path(__file__).resolve().parents[1]
RUN = "linear-lr0.05-s0"
# One run of two steps on the embedded default, small k-NN banks, no curve.
SWEEP = ["--strategies", "linear", "--lrs", "0.05", "--steps", "2", "--eval-every", "2", "--batch-size", "16",
         "--loader", "torch", "data.knn_train_limit=100", "data.knn_test_limit=50", "data.workers=0",
         "eval.knn_curve_limit=0", "eval.throughput_iters=0", "eval.shift=none"]


def busy_line(what: str, folder: Path, pid: int, by: str) -> re.Pattern:
    """The one line that refuses a folder `pid` holds."""
    return re.compile(rf"error: {what} {re.escape(str(folder))} is in use by {re.escape(by)} \(pid {pid} on "
                      rf"{re.escape(socket.gethostname())}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\): wait for it to "
                      rf"end, or stop it first")


def holding(folder: Path) -> subprocess.Popen:
    """A live process that holds `folder` (and says so once it does)."""
    code = "import sys, time; from engine.folder_lock import FolderLock; FolderLock.take(sys.argv[1], 'run folder'); " \
           "print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_held_folder_is_refused_naming_its_holder_and_free_once_it_is_killed(tmp_path):
    proc = holding(tmp_path)
    try:
        with pytest.raises(FolderBusy) as refused:
            FolderLock.take(tmp_path, "run folder")
        assert busy_line("run folder", tmp_path, proc.pid, "python").fullmatch(f"error: {refused.value}")
        assert holder(tmp_path).startswith(f"python (pid {proc.pid} on ")
    finally:
        proc.kill()
        proc.wait()
    assert holder(tmp_path) is None  # kill -9: the lock file stays, naming its dead holder; the lock is gone
    assert f'"pid": {proc.pid}' in (tmp_path / ".lock").read_text()
    with FolderLock.take(tmp_path, "run folder"):
        assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()


def test_a_lock_file_that_is_not_ours_still_refuses_in_one_line(tmp_path):
    (tmp_path / ".lock").write_text("garbage\nwith lines\n")
    proc = holding(tmp_path)
    try:
        (tmp_path / ".lock").write_text("{not json\n")
        with pytest.raises(FolderBusy, match=r"^sweep folder .* is in use by another process \(its lock file does not "
                                             r"say which\): wait for it to end, or stop it first$"):
            FolderLock.take(tmp_path, "sweep folder")
    finally:
        proc.kill()
        proc.wait()


def test_overwrite_of_a_live_run_folder_is_refused_before_any_work_and_touches_nothing(tmp_path, capsys):
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("step\n1\n")
    proc = holding(run_dir)
    try:
        before = snapshot(run_dir)
        assert main(["--strategy", "linear", "data.workers=0", "--out", str(tmp_path), "--name", "live",
                     "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and busy_line("run folder", run_dir, proc.pid, "python").fullmatch(err[0])
        assert snapshot(run_dir) == before
    finally:
        proc.kill()
        proc.wait()


def sweep(out: Path, log: Path) -> subprocess.Popen:
    return start([*SWEEP, "--out", str(out)], log=log, module="engine.sweep")


def wait_until(condition, procs, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        assert any(p.poll() is None for p in procs), "every process ended first"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Two identical sweeps started together; once one of them is on its run (stopped there with
    SIGSTOP, so that it is surely live), a third on the same folder; then the first carries on."""
    out = tmp_path_factory.mktemp("sweep")
    logs = {name: out.parent / f"{out.name}-{name}.log" for name in ("a", "b", "third")}
    together = {name: sweep(out, logs[name]) for name in ("a", "b")}
    try:
        wait_until(lambda: any(p.poll() is not None for p in together.values()), list(together.values()))
        refused = next(name for name, p in together.items() if p.poll() is not None)
        live = together["b" if refused == "a" else "a"]
        wait_until(lambda: (out / RUN / "config.yaml").is_file(), [live])
        os.killpg(live.pid, signal.SIGSTOP)  # the sweep and its run
        try:
            before = snapshot(out)
            third = sweep(out, logs["third"])
            third_code = third.wait(600)
            untouched = snapshot(out) == before
        finally:
            os.killpg(live.pid, signal.SIGCONT)
        live_code = live.wait(900)
    finally:
        for p in together.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return {"out": out, "live": live, "live_code": live_code, "refused_code": together[refused].returncode,
            "refused_log": logs[refused].read_text(), "third_code": third_code, "third_log": logs["third"].read_text(),
            "untouched": untouched}


def test_two_sweeps_started_together_one_refuses_naming_the_other_none_runs_twice_or_fails(sweeps):
    out, live = sweeps["out"], sweeps["live"]
    assert sweeps["live_code"] == 0
    assert sweeps["refused_code"] == 2
    lines = sweeps["refused_log"].strip().splitlines()
    assert len(lines) == 1 and busy_line("sweep folder", out, live.pid, "engine.sweep").fullmatch(lines[0]), lines
    record = json.loads((out / "sweep.json").read_text())
    assert record["outcomes"] == {RUN: 0}
    assert sorted(p.name for p in (out / "logs").iterdir()) == [f"{RUN}.log"]
    assert "----- attempt" not in (out / "logs" / f"{RUN}.log").read_text()  # one attempt, one writer


def test_a_sweep_started_while_another_runs_its_first_run_refuses_and_touches_nothing(sweeps):
    out, live = sweeps["out"], sweeps["live"]
    assert sweeps["third_code"] == 2
    lines = sweeps["third_log"].strip().splitlines()
    assert len(lines) == 1 and busy_line("sweep folder", out, live.pid, "engine.sweep").fullmatch(lines[0]), lines
    assert sweeps["untouched"]
    steps = [int(r["step"]) for r in read_rows(out / RUN / "metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == 2  # one run wrote them, once each
    assert (out / RUN / "results.json").is_file()


def test_a_rerun_keeps_the_earlier_attempts_log(tmp_path):
    point = build_grid(default_rows(["linear"]), [0], lrs=(0.05,))[0]
    codes = []
    for attempt in ("first", "second", "third"):
        launch_local([(point, [sys.executable, "-c", f"print('{attempt} attempt')"])], 1, tmp_path,
                     lambda p, code, s: codes.append(code))
    log = (tmp_path / f"{point.name}.log").read_text()
    assert codes == [0, 0, 0]
    attempts = re.split(r"\n----- attempt \d+, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d -----\n", log)
    assert [a.splitlines()[1] for a in attempts] == ["first attempt", "second attempt", "third attempt"]
    assert re.findall(r"^----- attempt (\d+), ", log, re.M) == ["2", "3"]


def test_a_partial_run_with_its_config_resumes_even_without_a_checkpoint(tmp_path):
    point = build_grid(default_rows(["linear"]), [0], lrs=(0.05,))[0]
    (tmp_path / point.name).mkdir()
    assert restart_command(point, tmp_path)[-1] == "--overwrite"  # no config.yaml: nothing to continue
    (tmp_path / point.name / "config.yaml").write_text("strategy: linear\n")
    assert restart_command(point, tmp_path)[3:] == ["--resume", str(tmp_path / point.name)]


def test_a_folder_that_cannot_hold_a_lock_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^run folder .*nope: cannot open its lock file .*nope/.lock \("):
        FolderLock.take(tmp_path / "nope", "run folder")


def test_a_lock_a_dead_holders_child_still_holds_is_waited_for_not_refused(tmp_path):
    """The holder dies (a SIGTERMed run) while a child it forked, a loader's worker, still holds the
    descriptor for a moment: the next taker waits for the child instead of refusing the dead pid."""
    folder, ended = tmp_path / "run", tmp_path / "child-ended"
    folder.mkdir()
    code = ("import os, sys, time; from engine.folder_lock import FolderLock; FolderLock.take(sys.argv[1], 'run folder')\n"
            "if os.fork() == 0:\n    time.sleep(1.5); open(sys.argv[2], 'w').close(); os._exit(0)\n"
            "os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(folder), str(ended)], cwd=ROOT, check=True)
    assert not ended.exists() and holder(folder) is not None  # its parent gone, the child holds the lock
    with FolderLock.take(folder, "run folder"):
        assert ended.exists()  # taken once the child had let go
