"""A sweep reuses a finished run only when its resolved config (every key of its config.yaml) and its
package versions are what the sweep would run now; a stale run is listed, set aside (never deleted) and
run again, or kept with --reuse-stale and named under the table. Run folders are written by hand, as
engine.run leaves them; the launcher is replaced by one that writes them too (no training)."""
import json

import pytest

import engine.sweep
from engine.config import parse_run_args, resolved_for_target, save_yaml
from engine.folder_lock import FolderLock
from engine.report import package_versions
from engine.sweep import main

ARGS = ["--strategies", "linear,lora", "--lrs", "0.05", "--steps", "2", "--eval-every", "2"]


def finished_run(sweep_dir, name, args, target=55.0, **changed):
    """A run folder as engine.run leaves it for `args`: config.yaml resolved (the embedded target, digits,
    fills its augmentation: crop 0.35, no flip), results.json with this process's package versions;
    `changed` overrides keys of the saved config (`train__momentum=0.8` -> train.momentum)."""
    run_dir = sweep_dir / name
    run_dir.mkdir(parents=True)
    cfg = resolved_for_target(parse_run_args([*args, "--out", str(sweep_dir), "--name", name], "test"), 0.35, 0.0)
    for key, value in changed.items():
        section, leaf = key.split("__")
        setattr(getattr(cfg, section), leaf, value)
    save_yaml(cfg, run_dir / "config.yaml")
    (run_dir / "results.json").write_text(json.dumps({
        **package_versions(), "strategy": cfg.strategy, "trainable_params": 1290, "target_top1": target,
        "source_knn_before": 90.0, "source_knn_after": 80.0, "forgetting": 10.0, "mean": (target + 80) / 2}))
    (run_dir / "source_knn.json").write_text(json.dumps({"best_val_top1": 50.0}))
    return run_dir


def grid_args(point_name):
    """engine.run's arguments of a run of ARGS (the sweep's own build, from its dry run's command)."""
    _, _, grid, _ = engine.sweep.plan(ARGS)
    return list(next(p for p in grid if p.name == point_name).args)


@pytest.fixture
def launches(monkeypatch):
    """The local launcher replaced by one that writes each run's folder as a finished run (target 66)."""
    launched = []

    def launch(jobs, parallel, log_dir, on_done):
        for point, cmd in jobs:
            launched.append(point.name)
            sweep_dir = log_dir.parent
            finished_run(sweep_dir, point.name, list(point.args), target=66.0)
            on_done(point, 0, 0.0)
    monkeypatch.setattr(engine.sweep, "launch_local", launch)
    return launched


def test_a_run_of_the_same_resolved_config_and_versions_is_reused(tmp_path, launches, capsys):
    for name in ("linear-lr0.05-s0", "lora-lr0.05-s0"):
        finished_run(tmp_path, name, grid_args(name))
    assert main([*ARGS, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert launches == [] and "stale" not in out
    assert "2 runs, 2 finished before, 0 to run" in out


def test_a_run_whose_config_differs_in_one_resolved_key_is_listed_set_aside_and_run_again(tmp_path, launches,
                                                                                           capsys):
    finished_run(tmp_path, "linear-lr0.05-s0", grid_args("linear-lr0.05-s0"), train__momentum=0.8)
    finished_run(tmp_path, "lora-lr0.05-s0", grid_args("lora-lr0.05-s0"))
    assert main([*ARGS, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("stale run"))
    assert line == (f"stale run linear-lr0.05-s0: train.momentum (0.8 -> 0.9); set aside in "
                    f"{tmp_path / 'stale' / 'linear-lr0.05-s0'}, to run again")
    assert launches == ["linear-lr0.05-s0"]
    kept = json.loads((tmp_path / "stale" / "linear-lr0.05-s0" / "results.json").read_text())
    assert kept["target_top1"] == 55.0  # the old run, kept whole
    assert json.loads((tmp_path / "linear-lr0.05-s0" / "results.json").read_text())["target_top1"] == 66.0
    table = (tmp_path / "table.md").read_text()
    assert "| Standard | linear | 0.05 | 1 | 1,290 | 66.00 |" in table
    assert "| linear | 0.05 | 1 | 1,290 | 55.00" not in table


def test_a_changed_default_missing_key_or_package_version_makes_a_run_stale(tmp_path, capsys):
    run_dir = finished_run(tmp_path, "linear-lr0.05-s0", grid_args("linear-lr0.05-s0"))
    results = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps({**results, "torch_version": "1.0.0"}))
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config.replace("  label_smoothing: 0.0\n", ""))
    assert main([*ARGS, "--out", str(tmp_path), "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("stale run"))
    assert line.startswith("stale run linear-lr0.05-s0: train.label_smoothing (not in its config.yaml; now 0.0); "
                           "torch_version (1.0.0 -> ")
    assert line.endswith("; would run again")


def test_reuse_stale_keeps_the_run_and_the_table_names_it(tmp_path, launches, capsys):
    finished_run(tmp_path, "linear-lr0.05-s0", grid_args("linear-lr0.05-s0"), train__momentum=0.8)
    finished_run(tmp_path, "lora-lr0.05-s0", grid_args("lora-lr0.05-s0"))
    assert main([*ARGS, "--out", str(tmp_path), "--reuse-stale"]) == 0
    out = capsys.readouterr().out
    assert "stale run linear-lr0.05-s0: train.momentum (0.8 -> 0.9); kept (--reuse-stale)" in out
    assert launches == [] and not (tmp_path / "stale").exists()
    table = (tmp_path / "table.md").read_text()
    assert "| Standard | linear | 0.05 | 1 | 1,290 | 55.00 |" in table
    assert "Kept with --reuse-stale although they differ from what this sweep runs now (config.yaml or package " \
           "versions): linear-lr0.05-s0 (train.momentum (0.8 -> 0.9))." in table


def test_a_stale_run_that_a_live_process_holds_is_refused_and_left_as_it_is(tmp_path, launches, capsys):
    run_dir = finished_run(tmp_path, "linear-lr0.05-s0", grid_args("linear-lr0.05-s0"), train__momentum=0.8)
    # held here (flock is per open file: the sweep's own take, on another descriptor, is refused as a
    # live holder's would be)
    with FolderLock.take(run_dir, "run folder"):
        code = main([*ARGS, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"run folder {run_dir} is in use by" in err[0]
    assert (run_dir / "results.json").is_file() and launches == []
