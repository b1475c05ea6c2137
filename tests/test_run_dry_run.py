"""`python -m engine.run --dry-run` runs the start checks a real start runs, for `--world-size N`
(or the launcher's world), on a meta-device model: what it accepts a start accepts, and what a start
refuses it refuses, in the same line."""
import pytest

from engine.run import main


def dry_run(capsys, *args) -> tuple[int, str, str]:
    code = main(["--dry-run", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()[-1] if captured.err.strip() else ""


def test_lamb_at_the_default_zero_stage_is_accepted_on_one_process_which_runs_stage_0(capsys):
    code, out, _ = dry_run(capsys, "--strategy", "lora", "--optimizer", "lamb")
    assert code == 0
    assert "ZeRO stage 0 runs, optimizer lamb" in out


@pytest.mark.parametrize("args", [["--world-size", "2"], ["--world-size", "2", "--zero-stage", "1"]])
def test_lamb_under_zero_1_or_2_on_several_processes_is_refused_as_a_start_refuses_it(capsys, args):
    code, _, err = dry_run(capsys, "--strategy", "lora", "--optimizer", "lamb", "--batch-size", "32", *args)
    assert code == 2 and err.startswith("error: --optimizer lamb adapts each tensor as a whole")


def test_the_launchers_world_counts_when_no_world_size_is_given(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, _, err = dry_run(capsys, "--strategy", "lora", "--optimizer", "lamb")
    assert code == 2 and "ZeRO stage 2 hands the optimiser one flat partition" in err


def test_the_batch_geometry_is_checked_for_the_world_size(capsys):
    code, _, err = dry_run(capsys, "--strategy", "linear", "--batch-size", "32", "--world-size", "3")
    assert code == 2 and err == "error: batch size 32 must be a multiple of grad_accum (1) x ranks (3)"
    code, out, _ = dry_run(capsys, "--strategy", "linear", "--batch-size", "96", "--world-size", "3",
                           "--grad-accum", "2")
    assert code == 0 and "global batch 96 = micro-batch 16 x accumulation 2 x 3 rank(s)" in out


def test_a_deepspeed_json_is_read_as_a_start_reads_it(capsys, tmp_path):
    """Its batch geometry wins, and a zero_optimization section makes one process run its stage."""
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": 48, "zero_optimization": {"stage": 2}}')
    code, out, _ = dry_run(capsys, "--strategy", "linear", "--deepspeed-config", str(ds))
    assert code == 0 and "global batch 48 = micro-batch 48 x accumulation 1 x 1 rank(s), ZeRO stage 2 runs" in out
    code, _, err = dry_run(capsys, "--strategy", "linear", "--optimizer", "lamb", "--deepspeed-config", str(ds))
    assert code == 2 and "ZeRO stage 2 hands the optimiser" in err


def test_world_size_without_dry_run_is_refused(tmp_path, capsys):
    code = main(["--world-size", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err == "error: --world-size only works with --dry-run (a run's processes are its launcher's)"
    assert not any(tmp_path.iterdir())
