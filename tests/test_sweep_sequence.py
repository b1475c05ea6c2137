"""A sweep row that is a sequence (engine.sequence): its commands (`--preset continual`), its state
(done only when sequence.json is complete, continued with the same command), its staleness (sequence.json's
identity, its stages' configs), and the table's sequence columns beside single runs, built from sequence
folders written by hand (no training: one real sequence of two tiny stages alone takes about 50 s here)."""
import csv
import json

import pytest
import yaml

import engine.sweep
from engine import continual
from engine.config import parse_run_args, resolved_for_target, save_yaml
from engine.presets import CONTINUAL, CONTINUAL_TARGETS, EMBEDDED
from engine.sweep import build_grid, find_stale, main, restart_command, run_command, sequence_of, state
from engine.sweep_report import write_report

from test_sweep import fake_run

SEQ_ROW = CONTINUAL.row("seq-lora-swap")
SINGLE_ROW = EMBEDDED.row("lora-r8")


def stage_folder(run_dir, target, val, config=None):
    """A stage's run folder as the report reads it: its validation accuracy and its config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "source_knn.json").write_text(json.dumps({"best_val_top1": val}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config or {
        "data": {"target": target, "source": "embedded"}, "eval": {"knn_report_k": 20}, "adapter": {"lora_rank": 8}}))


def fake_sequence(folder, matrix, source_after, vals, targets=CONTINUAL_TARGETS, before=90.0, complete=True,
                  identity=None):
    """A sequence folder as engine.sequence leaves it: a stage folder each, and sequence.json with the
    accuracy matrix `matrix` (row t: after stage t), the source k-NN after each stage and the stages'
    validation accuracies; `complete=False` stops it after its first stage."""
    stages = []
    for t, target in enumerate(targets[: len(matrix) if complete else 1]):
        run = f"{t + 1}-{target}"
        stage_folder(folder / run, target, vals[t])
        stages.append({"stage": t + 1, "target": target, "run": run, "top1": matrix[t], "source_knn_before": before,
                       "source_knn": source_after[t], "trainable_params": 1000, "wall_s": 10.0})
    R = [s["top1"][: len(stages)] for s in stages]
    (folder / "sequence.json").write_text(json.dumps({
        **(identity or {"strategy": "lora", "adapters": "swap", "targets": list(targets)}), "stages": stages,
        "matrix": R, "summary": continual.summary(R), "source_knn_untouched": before,
        "complete": len(stages) == len(targets)}))


# Two seeds of the LoRA swap row at two learning rates; per seed: (matrix, source after each stage, stage vals).
MATRIX_S0 = [[80.0, None, None], [70.0, 90.0, None], [60.0, 85.0, 75.0]]
MATRIX_S1 = [[82.0, None, None], [80.0, 88.0, None], [76.0, 84.0, 70.0]]
SEQUENCES = {(0.05, 0): (MATRIX_S0, [85.0, 80.0, 78.0], [70.0, 72.0, 74.0]),
             (0.05, 1): (MATRIX_S1, [84.0, 82.0, 80.0], [70.0, 70.0, 70.0]),
             (0.01, 0): (MATRIX_S0, [85.0, 80.0, 20.0], [80.0, 10.0, 10.0]),  # mean val 33.3: not chosen
             (0.01, 1): (MATRIX_S1, [84.0, 82.0, 20.0], [10.0, 10.0, 10.0])}


def sweep_of(tmp_path):
    grid = build_grid((SINGLE_ROW, SEQ_ROW), [0, 1], lrs=(0.05, 0.01))
    for p in grid:
        if p.row is SEQ_ROW:
            p.run_dir(tmp_path).mkdir()
            fake_sequence(p.run_dir(tmp_path), *SEQUENCES[p.lr, p.seed])
        else:
            fake_run(p.run_dir(tmp_path), "lora", 50.0 + p.seed, 60.0 + p.seed, 80.0, 5000)
    return grid


def table(sweep_dir):
    with open(sweep_dir / "table.csv") as f:
        return {r["row"]: r for r in csv.DictReader(f)}


def test_the_table_gives_a_sequences_average_accuracy_transfer_and_forgetting_beside_single_runs(tmp_path):
    md = write_report(tmp_path, sweep_of(tmp_path), EMBEDDED)
    rows = table(tmp_path)
    seq, single = rows[SEQ_ROW.key], rows[SINGLE_ROW.key]
    # by hand, seed 0: average (60 + 85 + 75) / 3; BWT ((60 - 80) + (85 - 90)) / 2 = -12.5; forgetting
    # (max(80, 70) - 60 + 90 - 85) / 2 = 12.5. Seed 1: (76 + 84 + 70) / 3; BWT (-6 - 4) / 2 = -5;
    # forgetting (82 - 76 + 88 - 84) / 2 = 5.
    average = ((60 + 85 + 75) / 3 + (76 + 84 + 70) / 3) / 2
    assert seq["best_lr"] == "0.05" and seq["seeds"] == "2"  # stages' mean validation: 72 and 70 against 33.3, 10
    assert float(seq["average_accuracy"]) == pytest.approx(average, abs=1e-4)
    assert float(seq["target_top1"]) == pytest.approx(average, abs=1e-4)
    assert float(seq["backward_transfer"]) == pytest.approx((-12.5 - 5) / 2)
    assert float(seq["mean_forgetting"]) == pytest.approx((12.5 + 5) / 2)
    assert float(seq["source_knn"]) == pytest.approx((78 + 80) / 2)  # after the last stage
    assert float(seq["val_top1"]) == pytest.approx((72 + 70) / 2)
    assert float(seq["mean_forgetting_sd"]) == pytest.approx(abs(12.5 - 5) / 2 ** 0.5, abs=1e-4)
    assert (single["average_accuracy"], single["backward_transfer"], single["mean_forgetting"]) == ("", "", "")
    assert float(single["target_top1"]) == 60.5
    lines = md.splitlines()
    assert lines[0].endswith(
        "| sequence: average accuracy % | sequence: backward transfer | sequence: mean forgetting |")
    lora_lines = [line for line in lines if "| LoRA r=8 |" in line or "| LoRA (swap) |" in line]
    assert lora_lines[0].endswith("| - | - | - |")  # the single run
    assert f"| {average:.2f} +- " in lora_lines[1] and "| -8.75 +- " in lora_lines[1]
    assert "LoRA (swap): digits -> digits-rot90 -> digits-inverted, adapters swap" in md
    with open(tmp_path / "runs.csv") as f:
        runs = {r["name"]: r for r in csv.DictReader(f)}
    assert float(runs["seq-lora-swap-lr0.01-s1"]["mean_forgetting"]) == 5.0
    assert runs["lora-r8-lr0.05-s0"]["mean_forgetting"] == ""


def test_a_table_of_sequences_alone_names_their_targets_in_order(tmp_path):
    grid = build_grid((SEQ_ROW,), [0], lrs=(0.05,))
    grid[0].run_dir(tmp_path).mkdir()
    fake_sequence(grid[0].run_dir(tmp_path), *SEQUENCES[0.05, 0])
    md = write_report(tmp_path, grid, CONTINUAL)
    assert md.splitlines()[0].startswith("| Group | Strategy | best LR | n | Trainable params | "
                                         "digits -> digits-rot90 -> digits-inverted top-1 | shapes 20-NN |")


def test_an_incomplete_sequence_is_partial_and_continues_with_its_own_command(tmp_path):
    point = build_grid((SEQ_ROW,), [0], lrs=(0.05,))[0]
    assert state(point, tmp_path, {}) == "new"
    point.run_dir(tmp_path).mkdir()
    fake_sequence(point.run_dir(tmp_path), *SEQUENCES[0.05, 0], complete=False)
    assert state(point, tmp_path, {}) == "partial"
    assert write_report(tmp_path, [point], CONTINUAL) == "no run has finished yet"  # not a finished row
    assert restart_command(point, tmp_path) == run_command(point, tmp_path)
    assert run_command(point, tmp_path)[1:7] == ["-m", "engine.sequence", "--targets", ",".join(CONTINUAL_TARGETS),
                                                 "--adapters", "swap"]
    fake_sequence(point.run_dir(tmp_path), *SEQUENCES[0.05, 0], complete=True)
    assert state(point, tmp_path, {}) == "done"


def real_stages(point, sweep_dir, complete=False, **changed):
    """The point's sequence folder with each stage's config.yaml as engine.run resolves it (the embedded
    digits domains fill crop 0.35, no flip) and a sequence.json of its identity, complete or with no
    stage measured; `changed` overrides keys of every stage's config (`train__momentum=0.8`)."""
    seq = sequence_of(point, sweep_dir)
    seq.folder.mkdir(parents=True)
    fake_sequence(seq.folder, *SEQUENCES[0.05, 0], identity=seq.identity())
    for t in range(len(seq.targets)):
        cfg = resolved_for_target(parse_run_args(seq.stage_args(t), "test"), 0.35, 0.0)
        for key, value in changed.items():
            section, leaf = key.split("__")
            setattr(getattr(cfg, section), leaf, value)
        save_yaml(cfg, seq.run_dir(t) / "config.yaml")
    if not complete:
        (seq.folder / "sequence.json").write_text(json.dumps({**seq.identity(), "stages": [], "complete": False}))
    return seq


def test_a_sequence_is_stale_when_its_identity_or_a_stages_config_differs_from_what_would_run_now(tmp_path):
    point = build_grid((SEQ_ROW,), [0], CONTINUAL.base_args, lrs=(0.05,))[0]
    states = {point.name: "partial"}
    seq = real_stages(point, tmp_path / "same")
    assert find_stale([point], tmp_path / "same", states, 1) == {}
    real_stages(point, tmp_path / "changed", train__momentum=0.8)
    why = find_stale([point], tmp_path / "changed", states, 1)[point.name]
    assert why[0] == "1-digits: train.momentum (0.8 -> 0.9)" and len(why) == 3
    other = build_grid((SEQ_ROW,), [0], lrs=(0.05,))[0]  # without the preset's arguments
    why = find_stale([other], tmp_path / "same", states, 1)[point.name]
    assert why == [f"run_args ({list(seq.run_args)!r} -> {list(sequence_of(other, tmp_path).run_args)!r})"]


def test_the_continual_preset_lists_four_sequence_rows_at_three_learning_rates(capsys, tmp_path):
    assert main(["--preset", "continual", "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "12 runs: 0 done, 0 diverged, 0 partial, 12 new"
    commands = {line.split(":", 1)[0].removeprefix("[new] "): line.split(": ", 1)[1] for line in lines[:-1]}
    assert len(commands) == 12
    assert commands["seq-selective-swap-lr0.01-s0"] == (
        "-m engine.sequence --targets digits,digits-rot90,digits-inverted --adapters swap eval.knn_curve_limit=0 "
        f"eval.shift=none --strategy selective_lora --lr 0.01 --seed 0 --out {tmp_path} "
        "--name seq-selective-swap-lr0.01-s0")
    modes = [(c.split("--adapters ")[1].split()[0], c.split("--strategy ")[1].split()[0]) for c in commands.values()]
    assert sorted(set(modes)) == [("merge", "full"), ("merge", "lora"), ("swap", "lora"), ("swap", "selective_lora")]
    assert all(modes.count(m) == 3 for m in modes)
    assert all("engine.run" not in c and "--target " not in c for c in commands.values())


@pytest.mark.parametrize("extra, message", [
    (["--target", "digits"], "--target is set by the sequence for each stage; use --targets"),
    (["--launcher", "submitit", "--gpus", "2"], "is a sequence, whose stages run in one process: give --gpus 1"),
])
def test_a_sequence_row_refuses_what_its_command_would_refuse_before_anything_starts(capsys, tmp_path, extra, message):
    assert main(["--preset", "continual", "--out", str(tmp_path / "sweep"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_launches_a_sequence_row_as_engine_sequence_and_keeps_it_once_complete(tmp_path, monkeypatch, capsys):
    """The local launcher replaced by one that leaves each sequence folder complete (no training): the first
    sweep launches the row's engine.sequence command and tables it; the same sweep again launches nothing."""
    launched = []

    def launch(jobs, parallel, log_dir, on_done):
        for point, cmd in jobs:
            launched.append(cmd[1:3])
            real_stages(point, log_dir.parent, complete=True)
            on_done(point, 0, 0.0)
    monkeypatch.setattr(engine.sweep, "launch_local", launch)
    args = ["--preset", "continual", "--rows", "seq-lora-swap", "--lrs", "0.05", "--out", str(tmp_path)]
    assert main(args) == 0
    assert launched == [["-m", "engine.sequence"]]
    assert float(table(tmp_path)["seq-lora-swap"]["mean_forgetting"]) == 12.5
    assert main(args) == 0
    assert launched == [["-m", "engine.sequence"]]
    assert "1 runs, 1 finished before, 0 to run" in capsys.readouterr().out
