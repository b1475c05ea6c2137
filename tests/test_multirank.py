"""Two gloo ranks under torchrun stand in for two GPUs: they compute what one rank does (the same
loss at every step for ZeRO 0, 2 and 3; the very same source k-NN accuracy, from sharded
extraction), and a 2-rank run killed with SIGKILL resumes on 2 ranks to the uninterrupted results.

The torch loader makes the global batches identical: its augmentation is seeded per sample and the
train shards are dealt round-robin (engine.data.sharding), so batch j of 2 ranks x b is batch j of
1 rank x 2b. (DALI's random operators draw from one stream per pipeline, i.e. per rank, so the same
sample gets another crop on another rank layout.) What remains is the order of float additions in
the gradient all-reduce and in batch-size-dependent kernels: losses agree to LOSS_RTOL.
"""
import json

import pytest

from bench.processes import finish, metric_rows, results
from durability import EQUIVALENCE, losses, run_here

LOSS_RTOL = 1e-5
@pytest.fixture(scope="module")
def two_ranks(two_rank_runs):
    return two_rank_runs[0] / "two-ranks"


def test_two_ranks_sigkilled_at_a_random_step_resume_to_the_uninterrupted_results(two_rank_runs, two_ranks):
    runs, step = two_rank_runs
    run_dir = runs / "killed"
    assert finish(["--resume", str(run_dir)], ranks=2, log=runs / "resumed.log") == 0
    assert results(run_dir) == results(two_ranks), f"killed after step {step}"
    assert metric_rows(run_dir) == metric_rows(two_ranks), f"killed after step {step}"


def test_sharded_knn_gives_exactly_the_one_process_accuracy(two_ranks, durable_reference):
    """The untouched backbone's k-NN, every k: each sample extracted on one of two ranks, the bank
    gathered, the queries scored where they were read."""
    two = json.loads((two_ranks / "source_knn.json").read_text())["before"]
    one = json.loads((durable_reference / "source_knn.json").read_text())["before"]
    assert two == one


def test_two_ranks_give_the_losses_of_one_under_zero_2(two_ranks, durable_reference):
    assert losses(two_ranks) == pytest.approx(losses(durable_reference), rel=LOSS_RTOL)


def test_two_ranks_give_the_losses_of_one_under_zero_0_and_3(two_rank_runs, tmp_path, capsys):
    """ZeRO 3 on one rank comes from a user DeepSpeed JSON (theirs wins, the contradiction is reported)."""
    runs, _ = two_rank_runs
    user_config = tmp_path / "ds.json"
    user_config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert run_here([*EQUIVALENCE, "--zero-stage", "0", "--out", str(tmp_path), "--name", "zero0"]) == 0
    assert run_here([*EQUIVALENCE, "--deepspeed-config", str(user_config), "--out", str(tmp_path),
                     "--name", "zero3"]) == 0
    out = capsys.readouterr().out
    assert f"note: DeepSpeed config {user_config} sets zero_optimization.stage = 3 over ours (2)" in out
    assert "global batch 8 = micro-batch 8 x accumulation 1 x 1 rank(s)" in out
    for stage in (0, 3):
        two, one = losses(runs / f"zero{stage}"), losses(tmp_path / f"zero{stage}")
        assert len(two) == len(one) == 4
        assert two == pytest.approx(one, rel=LOSS_RTOL), f"ZeRO {stage}"
    assert "global batch 8 = micro-batch 4 x accumulation 1 x 2 rank(s)" in (runs / "two-ranks.log").read_text()
