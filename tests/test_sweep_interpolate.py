"""A sweep row derived from another by weight interpolation (presets.Row.interpolate: the clip preset's
WiSE-FT alpha=0.5 of All): its engine.interpolate command into its own folder, its state and staleness, its
table cells read from a hand-written interpolation.csv over its source run's results, its learning rate the
source row's choice, its launch after the training runs, and the selective LoRA paper's zero-shot column.
No training: run folders and interpolation.csv are written by hand."""
import csv
import json
import os
import sys

import pytest

import engine.sweep
from engine.presets import CLIP, PAPER_ZEROSHOT_SOURCE, InterpolationOf, Row
from engine.sweep import build_grid, find_stale, main, restart_command, run_command, state
from engine.sweep_report import write_report

from test_sweep import fake_run

FULL, WISE = CLIP.row("full"), CLIP.row("wise-ft")


def clip_run(run_dir, val, target, source, zeroshot_after, zeroshot_before=60.0, shift=40.0):
    """A finished CLIP run: test_sweep's contract files plus zero-shot and shift figures."""
    fake_run(run_dir, "full", val, target, source, 86_000_000)
    results = json.loads((run_dir / "results.json").read_text())
    results.update(zeroshot_before={"cifar10": zeroshot_before, "mean": zeroshot_before},
                   zeroshot_after={"cifar10": zeroshot_after, "mean": zeroshot_after},
                   zeroshot_forgetting=zeroshot_before - zeroshot_after, target_shift_top1=shift,
                   shift_top1={"corrupt:all@3": shift})
    (run_dir / "results.json").write_text(json.dumps(results))


def interpolation_csv(folder, rows):
    """interpolation.csv as engine.interpolate writes it: a row per alpha."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(folder / "interpolation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def at(alpha, target, knn, zeroshot, shift):
    return {"alpha": alpha, "target_top1": target, "source_knn": knn, "target_shift_top1": shift,
            "shift_top1[corrupt:all@3]": shift, "zeroshot_mean": zeroshot, "zeroshot[cifar10]": zeroshot}


def table(sweep_dir):
    with open(sweep_dir / "table.csv") as f:
        return {r["row"]: r for r in csv.DictReader(f)}


def test_a_derived_point_interpolates_its_source_run_into_a_folder_of_its_own(tmp_path):
    grid = build_grid((FULL, WISE), [0, 1], lrs=(1e-5, 3e-5))
    derived = [p for p in grid if p.row is WISE]
    assert [p.name for p in derived] == ["wise-ft-lr1e-05-s0", "wise-ft-lr1e-05-s1", "wise-ft-lr3e-05-s0",
                                         "wise-ft-lr3e-05-s1"]
    point = derived[1]
    assert point.source.name == "full-lr1e-05-s1" and point.module == "engine.interpolate"
    assert run_command(point, tmp_path) == [sys.executable, "-m", "engine.interpolate",
                                            str(tmp_path / "full-lr1e-05-s1"), "--alphas", "0.5",
                                            "--out", str(tmp_path / "wise-ft-lr1e-05-s1")]
    assert restart_command(point, tmp_path) == run_command(point, tmp_path)


def test_a_derived_point_is_done_only_when_its_csv_has_its_alpha_and_stale_when_its_source_ran_again(tmp_path):
    source, point = build_grid((FULL, WISE), [0], lrs=(1e-5,))
    assert state(point, tmp_path, {}) == "new"
    clip_run(source.run_dir(tmp_path), 70.0, 80.0, 50.0, 45.0)
    assert state(point, tmp_path, {}) == "new"  # its source is finished, it is not
    interpolation_csv(point.run_dir(tmp_path), [at(0.0, 60.0, 70.0, 60.0, 30.0), at(1.0, 80.0, 50.0, 45.0, 40.0)])
    assert state(point, tmp_path, {}) == "partial"  # another alpha's curve is not this row's
    interpolation_csv(point.run_dir(tmp_path), [at(0.5, 78.0, 62.0, 55.0, 42.0)])
    states = {source.name: "done", point.name: state(point, tmp_path, {})}
    assert states[point.name] == "done"
    assert find_stale([point], tmp_path, states, 1) == {}
    made = (point.run_dir(tmp_path) / "interpolation.csv").stat().st_mtime
    os.utime(source.run_dir(tmp_path) / "results.json", (made + 10, made + 10))  # the source ran again
    assert find_stale([point], tmp_path, states, 1) == {
        point.name: ["full-lr1e-05-s0/results.json is newer than its interpolation.csv"]}


def test_the_table_reads_a_derived_row_at_its_alpha_over_its_source_run_at_the_source_rows_learning_rate(tmp_path):
    grid = build_grid((FULL, WISE), [0], lrs=(1e-5, 3e-5))
    runs = {1e-5: (70.0, 80.0, 50.0, 45.0), 3e-5: (75.0, 82.0, 40.0, 30.0)}  # validation picks 3e-5
    curves = {1e-5: at(0.5, 99.0, 99.0, 99.0, 99.0),  # a better test figure at the LR not chosen: not read
              3e-5: at(0.5, 79.0, 61.0, 55.5, 43.0)}
    for p in grid:
        if p.row is FULL:
            clip_run(p.run_dir(tmp_path), *runs[p.lr])
        else:
            interpolation_csv(p.run_dir(tmp_path), [at(0.0, 60.0, 90.0, 60.0, 30.0), curves[p.lr],
                                                    at(1.0, *runs[p.lr][1:3], runs[p.lr][3], 40.0)])
    md = write_report(tmp_path, grid, CLIP)
    rows = table(tmp_path)
    wise, full = rows["wise-ft"], rows["full"]
    assert full["best_lr"] == wise["best_lr"] == "3e-05"
    assert float(wise["target_top1"]) == 79.0 and float(wise["source_knn"]) == 61.0
    assert float(wise["forgetting"]) == 90.0 - 61.0  # against the source run's source_knn_before
    assert float(wise["mean"]) == (79.0 + 61.0) / 2
    assert float(wise["zeroshot_after"]) == 55.5 and float(wise["zeroshot_forgetting"]) == 60.0 - 55.5
    assert float(wise["target_shift_top1"]) == 43.0
    assert float(wise["val_top1"]) == 75.0 and wise["trainable_params"] == "86000000"  # the source's
    assert float(full["zeroshot_forgetting"]) == 30.0
    line = next(line for line in md.splitlines() if "| WiSE-FT alpha=0.5 of All |" in line)
    assert "| 79.00 | 61.00 | 70.00 |" in line
    assert "WiSE-FT alpha=0.5 of All: alpha 0.5 of each full run" in md
    with open(tmp_path / "runs.csv") as f:
        assert float({r["name"]: r for r in csv.DictReader(f)}["wise-ft-lr1e-05-s0"]["target_top1"]) == 99.0


def test_the_paper_zero_shot_column_sits_beside_ours_with_the_papers_figures_and_source(tmp_path):
    grid = build_grid(CLIP.rows, [0], lrs=(1e-5,))
    for p in grid:
        if p.row.key in ("full", "lora-r128"):
            clip_run(p.run_dir(tmp_path), 70.0, 80.0, 50.0, 45.0)
    lines = write_report(tmp_path, grid, CLIP).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    at_ours = head.index("zero-shot forgetting")
    assert head[at_ours + 1] == "paper: zero-shot forgetting"
    cells = {c[1] or c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:]
                                       if line.startswith("| "))}
    assert cells["All"][at_ours:at_ours + 2] == ["15.00", "16.24% (FLYP)"]
    assert cells["LoRA r=128"][at_ours:at_ours + 2] == ["15.00", "17.12%"]
    assert cells["Selective LoRA r=128, 6.25%"][at_ours:at_ours + 2] == ["-", "7.31 less (on average)"]  # not run
    assert cells["LoRA r=8"][at_ours + 1] == ""
    assert PAPER_ZEROSHOT_SOURCE in "\n".join(lines) and "seeds.md" in PAPER_ZEROSHOT_SOURCE
    assert table(tmp_path)["lora-r128"]["paper_zeroshot_forgetting"] == "17.12%"


def test_the_clip_presets_dry_run_lists_the_wise_ft_rows_after_all(capsys, tmp_path):
    weights = tmp_path / "ViT-B-16.pt"
    weights.touch()
    assert main(["--preset", "clip", "--out", str(tmp_path / "sweep"), "--weights", str(weights),
                 "data.source=imagefolder:/data/imagenet", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "21 runs: 0 done, 0 diverged, 0 partial, 21 new"
    names = [line.split(":", 1)[0].removeprefix("[new] ") for line in lines[:-1]]
    assert names[:6] == ["full-lr1e-05-s0", "full-lr3e-05-s0", "full-lr0.0001-s0",
                         "wise-ft-lr1e-05-s0", "wise-ft-lr3e-05-s0", "wise-ft-lr0.0001-s0"]
    sweep = tmp_path / "sweep"
    assert lines[4] == (f"[new] wise-ft-lr3e-05-s0: -m engine.interpolate {sweep / 'full-lr3e-05-s0'} --alphas 0.5 "
                        f"--out {sweep / 'wise-ft-lr3e-05-s0'}")


def test_a_derived_row_without_its_source_row_before_it_is_refused(capsys, tmp_path):
    weights = tmp_path / "w.pt"
    weights.touch()
    assert main(["--preset", "clip", "--rows", "wise-ft", "--out", str(tmp_path / "s"), "--weights", str(weights),
                 "data.source=imagefolder:/data/imagenet", "--dry-run"]) == 2
    assert "row wise-ft interpolates row 'full'" in capsys.readouterr().err
    with pytest.raises(engine.errors.UserError, match="before it"):
        build_grid((Row("w", "w", "Standard", "full", interpolate=InterpolationOf("full", 0.5)), FULL), [0],
                   lrs=(0.1,))


@pytest.mark.parametrize("source_code", [0, 1])
def test_a_sweep_launches_derived_points_after_their_sources_and_only_once_they_finished(
        tmp_path, monkeypatch, capsys, source_code):
    """The local launcher replaced (no training): the training runs go first; the interpolation follows in a
    second launch only when its source finished."""
    launched = []

    def launch(jobs, parallel, log_dir, on_done):
        launched.append([cmd[2] for _, cmd in jobs])
        for point, cmd in jobs:
            if cmd[2] == "engine.run" and source_code == 0:
                clip_run(point.run_dir(tmp_path), 70.0, 80.0, 50.0, 45.0)
            elif cmd[2] == "engine.interpolate":
                assert cmd[3] == str(point.source.run_dir(tmp_path))
                interpolation_csv(point.run_dir(tmp_path), [at(0.5, 78.0, 62.0, 55.0, 42.0)])
            on_done(point, source_code if cmd[2] == "engine.run" else 0, 0.0)
    monkeypatch.setattr(engine.sweep, "launch_local", launch)
    weights = tmp_path / "w.pt"
    weights.touch()
    code = main(["--preset", "clip", "--rows", "full,wise-ft", "--lrs", "1e-5", "--out", str(tmp_path),
                 "--weights", str(weights), "data.source=imagefolder:/data/imagenet"])
    if source_code == 0:
        assert code == 0 and launched == [["engine.run"], ["engine.interpolate"]]
        assert float(table(tmp_path)["wise-ft"]["target_top1"]) == 78.0
    else:
        assert code == 1 and launched == [["engine.run"]]
        assert "1 derived runs wait for their source runs (wise-ft-lr1e-05-s0)" in capsys.readouterr().out


def test_engine_interpolate_out_writes_into_its_own_folder_and_leaves_the_run_folder_as_it_was(tmp_path, capsys):
    """One tiny real run (embedded default, 4 steps) and its interpolation at 0.5 into another folder: the
    derived point it would be in a sweep is done, and the run folder holds exactly the files it had."""
    from engine.interpolate import main as interpolate_main
    from engine.run import main as run_main
    from test_interpolate import QUICK
    assert run_main([*QUICK, "--strategy", "lora", "--out", str(tmp_path), "--name", "full-lr0.05-s0",
                     "eval.shift=none"]) == 0
    run_dir = tmp_path / "full-lr0.05-s0"
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    out = tmp_path / "wise-ft-lr0.05-s0"
    assert interpolate_main([str(run_dir), "--alphas", "0.5", "--out", str(out)]) == 0
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    with open(out / "interpolation.csv") as f:
        assert [float(r["alpha"]) for r in csv.DictReader(f)] == [0.5]
    assert (out / "interpolation.png").is_file()
    point = build_grid((Row("full", "All", "Standard", "lora"), WISE), [0], lrs=(0.05,))[1]
    assert point.run_dir(tmp_path) == out and state(point, tmp_path, {}) == "done"
    (tmp_path / "file").touch()
    assert interpolate_main([str(run_dir), "--alphas", "0.5", "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'file'} is a file, not a folder\n"


def test_a_derived_point_of_a_source_to_run_again_is_set_aside_with_it(tmp_path, monkeypatch, capsys):
    """The source run is partial (stopped before its config): the interpolation beside it is of an earlier
    run, so the sweep sets it aside and redoes it after the source."""
    source, point = build_grid((FULL, WISE), [0], lrs=(1e-5,))
    source.run_dir(tmp_path).mkdir()
    interpolation_csv(point.run_dir(tmp_path), [at(0.5, 78.0, 62.0, 55.0, 42.0)])
    launched = []

    def launch(jobs, parallel, log_dir, on_done):
        for p, cmd in jobs:
            launched.append(p.name)
            if p is not point and p.source is None:
                source.run_dir(tmp_path).rmdir()
                clip_run(source.run_dir(tmp_path), 70.0, 80.0, 50.0, 45.0)
            else:
                interpolation_csv(p.run_dir(tmp_path), [at(0.5, 77.0, 63.0, 55.0, 42.0)])
            on_done(p, 0, 0.0)
    monkeypatch.setattr(engine.sweep, "launch_local", launch)
    weights = tmp_path / "w.pt"
    weights.touch()
    assert main(["--preset", "clip", "--rows", "full,wise-ft", "--lrs", "1e-5", "--out", str(tmp_path),
                 "--weights", str(weights), "data.source=imagefolder:/data/imagenet"]) == 0
    assert launched == [source.name, point.name]
    assert "stale run wise-ft-lr1e-05-s0: its source full-lr1e-05-s0 is to run again; set aside" in capsys.readouterr().out
    assert (tmp_path / "stale" / point.name / "interpolation.csv").is_file()
    assert float(table(tmp_path)["wise-ft"]["target_top1"]) == 77.0
