"""Run folders: claimed atomically by real processes, never written into unless the user asks."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.distributed import LAUNCHER_ENV
from engine.errors import UserError
from engine.run import main

ROOT = Path(__file__).resolve().parents[1]
# digits as the source too: reading it takes a moment, generating the shapes domain longer
SMALL = ["--strategy", "linear", "--source", "digits", "--loader", "torch", "--batch-size", "16", "data.workers=0",
         "data.knn_train_limit=100", "data.knn_test_limit=50", "eval.knn_curve_limit=0", "eval.throughput_iters=0"]


def user_env() -> dict:
    """This environment without what an in-process run (or a launcher) set: a fresh process, as a user starts it."""
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}, "PYTHONPATH": str(ROOT)}


def start_run(out: Path, log: Path, *args) -> subprocess.Popen:
    """`python -m engine.run` in its own process."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "engine.run", *SMALL, "--out", str(out), *args],
                                cwd=ROOT, env=user_env(), stdout=f, stderr=subprocess.STDOUT)


def wait_until(condition, procs, timeout: float = 400.0):
    """Poll `condition` until it holds; fail if every process ended first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if all(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            return condition()
        time.sleep(0.2)
    return True


def kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_runs_started_together_never_share_a_folder(tmp_path):
    """Both runs find their default name (`linear-<time>`) taken, as two runs started in the same
    second do: each gets a folder of its own, and the taken folders stay untouched."""
    out = tmp_path / "runs"
    now = time.time()
    taken = {f"linear-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}" for s in range(-2, 900)}
    for name in taken:
        (out / name).mkdir(parents=True)
    procs = [start_run(out, tmp_path / f"seed{seed}.log", "--seed", str(seed)) for seed in (1, 2)]
    try:
        claimed = lambda: sorted(p.parent for p in out.glob("*/config.yaml"))  # noqa: E731
        wait_until(lambda: len(claimed()) >= 2, procs)
    finally:
        kill(procs)
    assert all(not any((out / name).iterdir()) for name in taken)
    folders = claimed()
    seeds = sorted(yaml.safe_load((f / "config.yaml").read_text())["seed"] for f in folders)
    assert len(folders) == 2 and seeds == [1, 2], (tmp_path / "seed1.log").read_text()[-2000:]
    assert all(f.name.startswith(tuple(taken)) and f.name not in taken for f in folders)


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run killed with SIGKILL after its first checkpoint, as a crash or an OOM killer leaves it."""
    root = tmp_path_factory.mktemp("kill9")
    run_dir = root / "runs" / "kill9"
    proc = start_run(root / "runs", root / "kill9.log", "--name", "kill9", "--steps", "500", "--eval-every", "1")
    try:
        assert wait_until(lambda: (run_dir / "checkpoints/best/adapter.json").is_file()
                          and (run_dir / "metrics.csv").is_file()
                          and "step 1:" in (root / "kill9.log").read_text(), [proc]), (root / "kill9.log").read_text()
    finally:
        kill([proc])
    return run_dir, (root / "kill9.log").read_text()


def test_an_interrupted_runs_folder_is_never_written_into(interrupted_run, capsys):
    """The same --name again is refused, and the folder (metrics.csv, checkpoints/best) stays
    exactly as the killed run left it."""
    run_dir, _ = interrupted_run
    before = snapshot(run_dir)
    code = main([*SMALL, "--steps", "2", "--out", str(run_dir.parent), "--name", "kill9", "--seed", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: run folder {run_dir} already exists; pick another --name, or pass --overwrite "
                   f"to replace it"]
    assert snapshot(run_dir) == before


def test_a_real_runs_output_holds_no_deepspeed_chatter(interrupted_run):
    """DeepSpeed's accelerator line (on import) and optimiser banner (at initialize) need --verbose."""
    _, log = interrupted_run
    assert "step 1:" in log  # the log reaches past DeepSpeed's start-up
    assert "Setting accelerator" not in log and "untested optimizer" not in log and "[WARNING]" not in log


def test_a_taken_default_name_gets_the_next_free_suffix(tmp_path, monkeypatch):
    from engine import run_folder

    monkeypatch.setattr(run_folder, "default_name", lambda strategy: f"{strategy}-T")
    (tmp_path / "lora-T").mkdir()
    (tmp_path / "lora-T-2").mkdir()
    with run_folder.claim(tmp_path, None, "lora") as first, run_folder.claim(tmp_path, None, "lora") as second:
        assert (first.folder.name, second.folder.name) == ("lora-T-3", "lora-T-4")


def test_an_explicit_name_that_exists_is_refused_unless_overwrite(tmp_path):
    from engine import run_folder

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.csv").write_text("step\n1\n")
    with pytest.raises(UserError, match="already exists"):
        run_folder.claim(tmp_path, "x", "lora")
    assert (tmp_path / "x" / "metrics.csv").is_file()
    with run_folder.claim(tmp_path, "x", "lora", reuse="overwrite") as lock:
        assert lock.folder == tmp_path / "x" and [p.name for p in lock.folder.iterdir()] == [".lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # the old folder is gone, nothing set aside


def test_out_on_a_read_only_file_system_is_one_line(tmp_path):
    """A real read-only mount (tmpfs mounted ro in a private user and mount namespace)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespaces here to mount a read-only file system in")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = 'mount -t tmpfs -o ro tmpfs "$1" && shift && exec "$@"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(ro), sys.executable, "-m", "engine.run",
                           "--strategy", "linear", "data.workers=0", "--out", str(ro / "runs")],
                          cwd=ROOT, env=user_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --out {ro / 'runs'}: cannot create files in {ro} (a read-only file system)"]
