"""engine.sequence: two-stage sequences on the embedded backbone (swap keeps stage 1's accuracy exactly,
merge changes it), an interrupted sequence continued at the stage it stopped in, the embedded domains,
and bad input refused before anything is written."""
import contextlib
import csv
import io
import json
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench.processes import signal_tree, start
from durability import snapshot
from engine import sequence
from engine.checkpoint import checkpoint_dirs
from engine.data import DATASETS, SPEC_HELP, load_domain

# Six steps at a learning rate that moves the weights in that time, a full checkpoint every two
# (what the killed sequence resumes from), tiny k-NN banks, nothing the sequence does not read.
SMALL = ["--steps", "6", "--eval-every", "6", "--checkpoint-every", "2", "--batch-size", "8", "--lr", "0.1",
         "train.warmup_steps=0", "--loader", "torch", "train.log_every=1", "data.knn_train_limit=20",
         "data.knn_test_limit=10", "data.workers=0", "eval.knn_curve_limit=0", "eval.throughput_iters=0",
         "eval.shift=none"]
TARGETS = ["--targets", "digits,digits-rot90"]


def run_sequence_here(args):
    """`python -m engine.sequence` in this process, on one thread as a process of bench.processes runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sequence.main(args)
    finally:
        torch.set_num_threads(threads)


def record(folder):
    return json.loads((folder / "sequence.json").read_text())


def results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def swapped(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence")
    args = [*TARGETS, "--strategy", "lora", "--adapters", "swap", *SMALL, "--out", str(out), "--name", "swap"]
    assert run_sequence_here(args) == 0
    return out / "swap"


def test_swap_keeps_an_earlier_targets_accuracy_exactly(swapped):
    rec = record(swapped)
    (first, _), (again, second) = [s["top1"] for s in rec["stages"]]
    assert again == first == results(swapped / "1-digits")["target_top1"]  # adapter 1 loaded again: the same
    assert second == results(swapped / "2-digits-rot90")["target_top1"]
    assert rec["matrix"] == [[first, None], [first, second]] and rec["complete"]
    assert rec["summary"]["backward_transfer"] == 0.0 and rec["summary"]["forgetting"] == [0.0]
    stage2 = (swapped / "2-digits-rot90" / "config.yaml").read_text()
    assert "weights: null" in stage2  # trained from the untouched backbone


def test_the_sequence_files(swapped):
    with open(swapped / "matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    rec = record(swapped)
    first, second = rec["stages"][0]["top1"][0], rec["stages"][1]["top1"][1]
    assert rows == [["stage", "digits", "digits-rot90"], ["digits", f"{first:g}", ""],
                    ["digits-rot90", f"{first:g}", f"{second:g}"]]
    with open(swapped / "sequence.csv", newline="") as f:
        stages = list(csv.DictReader(f))
    assert [(s["stage"], s["target"], s["strategy"], s["adapters"]) for s in stages] == \
        [("1", "digits", "lora", "swap"), ("2", "digits-rot90", "lora", "swap")]
    assert float(stages[1]["average_accuracy"]) == pytest.approx((first + second) / 2, abs=1e-4)
    assert stages[0]["backward_transfer"] == "" and float(stages[1]["backward_transfer"]) == 0.0
    for t, name in enumerate(("1-digits", "2-digits-rot90")):  # a swapped target keeps its adapter and head
        adapter = load_file(swapped / name / "adapter" / "adapter.safetensors")
        assert int(stages[t]["task_bytes"]) == sum(v.numel() * 4 for v in adapter.values())
        assert float(stages[t]["source_knn"]) == results(swapped / name)["source_knn_after"]
    assert int(stages[0]["shared_bytes"]) == 4 * 1_204_608  # the embedded ViT's 1.2 M fp32 weights (no head)
    for png in ("matrix.png", "source.png"):
        assert (swapped / png).read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def killed_and_continued(tmp_path_factory):
    """A merge sequence (full fine-tuning) SIGKILLed in stage 2 once that stage wrote a full checkpoint,
    then the same command again. Returns the folder, stage 1's files before the kill, and what the
    dry run and the continuation printed."""
    out = tmp_path_factory.mktemp("sequence")
    args = [*TARGETS, "--strategy", "full", *SMALL, "--out", str(out), "--name", "merge"]
    folder = out / "merge"
    proc = start(args, log=out / "first.log", module="engine.sequence")
    try:
        deadline = time.monotonic() + 300
        while not checkpoint_dirs(folder / "2-digits-rot90") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        before = snapshot(folder / "1-digits")
        assert checkpoint_dirs(folder / "2-digits-rot90"), (out / "first.log").read_text()[-2000:]
    finally:
        signal_tree(proc, signal.SIGKILL)
    stopped = record(folder)
    assert not (folder / "2-digits-rot90" / "results.json").exists()
    # continued here, in the fixture: every test of it sees the continued sequence, whichever runs first
    dry, said = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(dry):
        dry_code = sequence.main(["--resume", str(folder), "--dry-run"])
    with contextlib.redirect_stdout(said):
        code = run_sequence_here(args)
    return folder, before, stopped, (dry_code, dry.getvalue(), code, said.getvalue())


def test_a_killed_sequence_continues_at_the_stage_it_stopped_in(killed_and_continued):
    folder, before, stopped, (dry_code, dry, code, said) = killed_and_continued
    assert [s["target"] for s in stopped["stages"]] == ["digits"] and not stopped["complete"]
    assert dry_code == 0
    shown = dry.splitlines()
    assert shown[0] == "[measured] full (merge) stage 1 digits"
    assert shown[1] == f"[partial] full (merge) stage 2 digits-rot90: python -m engine.run --resume {folder / '2-digits-rot90'}"
    assert code == 0
    assert f"stage 2/2: digits-rot90 (resuming {folder / '2-digits-rot90'})" in said
    assert "stage 1/2" not in said  # stage 1 was neither trained nor started again
    assert snapshot(folder / "1-digits") == before
    with open(folder / "2-digits-rot90" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # one row a step: resumed, not run twice
    assert record(folder)["complete"]


def test_merge_trains_on_the_merged_backbone_and_changes_an_earlier_targets_accuracy(killed_and_continued):
    folder, *_ = killed_and_continued
    rec = record(folder)
    (first, _), (after, second) = [s["top1"] for s in rec["stages"]]
    assert first == results(folder / "1-digits")["target_top1"]
    assert second == results(folder / "2-digits-rot90")["target_top1"]
    assert after != first  # head 1 on the backbone stage 2 changed
    assert rec["summary"]["backward_transfer"] == pytest.approx(after - first)
    merged = folder / "merged" / "1-digits.safetensors"
    assert f"weights: {merged}" in (folder / "2-digits-rot90" / "config.yaml").read_text()
    # the merged file is stage 1's model exactly: stage 2 starts where stage 1's k-NN left off
    assert results(folder / "2-digits-rot90")["source_knn_before"] == results(folder / "1-digits")["source_knn_after"]
    head = load_file(merged)["head.weight"].numel() * 4 + 10 * 4
    assert [s["task_bytes"] for s in rec["stages"]] == [head, head]  # merged: each target keeps only its head


def test_block_expansion_merged_deepens_each_stages_backbone_by_its_copies(tmp_path):
    """Merged, block expansion's copies are ordinary blocks: stage 2 starts from the 6 + 1 blocks stage 1
    left (model.depth=7, its merged file exactly: stage 2's before-k-NN is stage 1's after) and adds one."""
    args = [*TARGETS, "--strategy", "block_expansion", "--blocks", "1", *SMALL, "--out", str(tmp_path), "--name", "be"]
    assert run_sequence_here(args) == 0
    folder = tmp_path / "be"
    depth = lambda f: 1 + max(int(k.split(".")[1]) for k in load_file(f) if k.startswith("blocks."))
    assert [depth(folder / "merged" / f"{s}.safetensors") for s in ("1-digits", "2-digits-rot90")] == [7, 8]
    assert "depth: 7" in (folder / "2-digits-rot90" / "config.yaml").read_text()
    assert results(folder / "2-digits-rot90")["source_knn_before"] == results(folder / "1-digits")["source_knn_after"]
    (first, _), (after, second) = [s["top1"] for s in record(folder)["stages"]]
    assert first == results(folder / "1-digits")["target_top1"] and second == results(folder / "2-digits-rot90")["target_top1"]
    assert after != first  # head 1 on the deeper backbone stage 2 trained


def test_the_embedded_domains_are_digits_rotated_and_inverted():
    digits = load_domain("digits")
    rotated, inverted = load_domain("digits-rot90"), load_domain("digits-inverted", role="source")
    for split in ("train", "test"):
        base = getattr(digits, split)
        assert np.array_equal(getattr(rotated, split).images, np.rot90(base.images, 1, axes=(1, 2)))
        assert np.array_equal(getattr(inverted, split).images, 255 - base.images)
        assert np.array_equal(getattr(rotated, split).labels, base.labels)
    assert (rotated.name, rotated.num_classes, rotated.hflip) == ("digits-rot90", 10, 0.0)
    assert DATASETS["digits-inverted"].num_classes == 10
    assert "digits-rot90 | digits-inverted" in SPEC_HELP and "digits-rot90" in sequence._parser().format_help()


def test_the_preset_plans_four_sequences_and_starts_nothing(tmp_path, capsys):
    assert sequence.main(["--preset", "embedded", "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" stage")[0] for line in lines[::3]] == \
        ["[new] full (merge)", "[new] lora (merge)", "[new] lora (swap)", "[new] selective_lora (swap)"]
    assert f"--weights {tmp_path / 'sequence-embedded' / 'lora-merge' / 'merged' / '1-digits.safetensors'}" in lines[4]
    assert "--weights" not in lines[7] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, says", [
    (["--targets", "digits,digits-rot90", "--strategy", "full", "--adapters", "swap"], "full trains the backbone"),
    (["--targets", "digits,digits-rot90", "--strategy", "block_expansion", "--blocks", "9"],
     "blocks (P) must be between 1 and the model's depth 6"),
    (["--targets", "digits"], "at least two targets"),
    (["--targets", "digits,digits-rot90,digits"], "names digits twice"),
    (["--targets", "digits,nope"], "unknown data set 'nope'"),
    (["--targets", "digits,digits-rot90", "--target", "digits"], "--target is set by the sequence"),
    (["--targets", "digits,digits-rot90", "--overwrite"], "--overwrite is set by the sequence"),
    (["--targets", "digits,digits-rot90", "--steps", "x"], "argument --steps: invalid int value"),
    (["--preset", "embedded", "--strategy", "lora"], "the preset sets each sequence's strategy"),
    ([], "give --targets LIST"),
])
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, capsys, args, says):
    assert sequence.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_another_sequence_is_refused(tmp_path, capsys):
    folder = tmp_path / "sequence-lora-merge"
    folder.mkdir()
    (folder / "sequence.json").write_text(json.dumps({"strategy": "lora", "adapters": "merge",
                                                      "targets": ["digits", "digits-rot90"], "run_args": ["--strategy", "lora"]}))
    assert sequence.main(["--targets", "digits,digits-inverted", "--strategy", "lora", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds a sequence with other arguments: targets" in err and "digits-inverted" in err


def test_resume_takes_a_sequence_folder_and_nothing_else(tmp_path, capsys):
    assert sequence.main(["--resume", str(tmp_path)]) == 2
    assert "not a sequence folder (no sequence.json or sequences.json)" in capsys.readouterr().err
    assert sequence.main(["--resume", str(tmp_path), "--steps", "3"]) == 2
    assert "give nothing else" in capsys.readouterr().err


def test_several_ranks_are_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sequence.main(["--targets", "digits,digits-rot90"]) == 2
    assert "not torchrun" in capsys.readouterr().err


def test_a_sequence_folder_another_process_holds_is_refused(tmp_path, capsys):
    from engine.folder_lock import FolderLock
    folder = tmp_path / "held"
    folder.mkdir()
    with FolderLock.take(folder, "sequence folder"):  # another descriptor: flock refuses it as it would another process
        assert sequence.main([*TARGETS, "--strategy", "lora", *SMALL, "--out", str(tmp_path), "--name", "held"]) == 2
    err = capsys.readouterr().err
    assert f"error: sequence folder {folder} is in use by" in err
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_a_finished_sequence_reads_as_a_sweep_row(swapped):
    rec = record(swapped)
    results_, val = sequence.sweep_results(swapped)
    stage_results = [results(swapped / s["run"]) for s in rec["stages"]]
    assert results_["target_top1"] == results_["average_accuracy"] == rec["summary"]["average_accuracy"]
    assert results_["source_knn_before"] == stage_results[0]["source_knn_before"]
    assert results_["source_knn_after"] == stage_results[1]["source_knn_after"]
    assert results_["wall_s"] == pytest.approx(sum(r["wall_s"] for r in stage_results))
    knn = [json.loads((swapped / s["run"] / "source_knn.json").read_text()) for s in rec["stages"]]
    assert val == pytest.approx(sum(k["best_val_top1"] for k in knn) / 2)
    assert sequence.sweep_results(swapped / "1-digits") is None  # no sequence there
