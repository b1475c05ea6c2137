"""The train loop: log points in metrics.csv, non-finite gradients stop the run, no host reads in a step."""
import contextlib
import csv
import json

import pytest
import torch

from engine.run import main

from host_reads import spy_on_host_reads

QUICK = ["--batch-size", "16", "data.knn_train_limit=100", "data.knn_test_limit=50", "data.workers=0",
         "eval.knn_curve_limit=0", "eval.throughput_iters=0"]  # the curve's own rows: tests/test_curve.py


def run_cli(tmp_path, name, *args):
    return main([*QUICK, "--out", str(tmp_path), "--name", name, *args]), tmp_path / name


def rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_has_a_row_every_log_every_steps_and_at_each_eval(tmp_path):
    code, run_dir = run_cli(tmp_path, "log", "--strategy", "linear", "--steps", "6", "--eval-every", "3",
                            "train.log_every=2")
    assert code == 0
    got = [(int(r["step"]), r["val_top1"] != "") for r in rows(run_dir)]
    assert got == [(2, False), (3, True), (4, False), (6, True)]
    assert all(float(r["train_loss"]) > 0 and r["skipped_steps"] == "0" for r in rows(run_dir))


def test_non_finite_gradients_stop_the_run_name_the_step_and_are_counted(tmp_path, capsys):
    """DeepSpeed's ZeRO optimiser (here stage 3 on one process) skips a step whose gradients overflow;
    a run that only skips must not end as a success."""
    code, run_dir = run_cli(tmp_path, "overflow", "--strategy", "lora", "--lr", "1e9", "--steps", "20",
                            "--eval-every", "1", "--zero-stage", "3")
    err = capsys.readouterr().err
    assert code == 3
    assert "gradients were not finite (DeepSpeed skipped the optimiser step) at step" in err
    step = int(err.split("skipped the optimiser step) at step ")[1].split(";")[0])
    last = rows(run_dir)[-1]
    assert (int(last["step"]), last["skipped_steps"]) == (step, "1")
    assert json.loads((run_dir / "checkpoints/last/trainer.json").read_text())["step"] == step - 1
    assert not (run_dir / "results.json").exists()


@pytest.mark.parametrize("checkpoint_every", [None, 1])
def test_under_zero_0_non_finite_gradients_stop_the_run_before_any_checkpoint_holds_them(tmp_path, capsys,
                                                                                         checkpoint_every):
    """One process runs ZeRO 2 as stage 0, where nothing in DeepSpeed checks the gradients: the step
    records their finiteness on the device, and the run stops at the next log point or full
    checkpoint (every step here, and with the log points 5 steps apart), naming the step; no saved
    checkpoint holds the weights that step reached."""
    from safetensors.torch import load_file

    every = [] if checkpoint_every is None else ["--checkpoint-every", "1", "train.log_every=5", "--eval-every", "5"]
    code, run_dir = run_cli(tmp_path, "overflow", "--strategy", "lora", "--lr", "1e9", "--steps", "20",
                            "--eval-every", "1", *every)
    err = capsys.readouterr().err
    assert code == 3
    assert "error: gradients were not finite at step " in err
    step = int(err.split("not finite at step ")[1].split(";")[0])
    logged = rows(run_dir) if (run_dir / "metrics.csv").exists() else []
    assert all(int(r["step"]) < step and r["skipped_steps"] == "0" for r in logged)
    saved = [load_file(path) for path in run_dir.glob("checkpoints/*/adapter.safetensors")]
    saved += [torch.load(path, map_location="cpu", weights_only=False)["module"]
              for path in run_dir.glob("checkpoints/full/*/deepspeed/mp_rank_00_model_states.pt")]
    assert saved and all(torch.isfinite(t).all() for state in saved for t in state.values())
    if checkpoint_every:
        steps = [json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoints/full/*/manifest.json")]
        assert steps and max(steps) == step - 1
    assert not (run_dir / "results.json").exists()


def test_a_train_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Host reads (a sync on a GPU) from the project's code happen only at log and eval steps."""
    reads = spy_on_host_reads(monkeypatch)
    code, _ = run_cli(tmp_path, "sync", "--strategy", "lora", "--steps", "6", "--eval-every", "6",
                      "train.log_every=3")
    assert code == 0
    assert {step for step, _, _ in reads} <= {3, 6}, [r for r in reads if r[0] not in (3, 6)][:5]
    assert any(step == 3 for step, _, _ in reads)  # the spy sees the log point's read


@pytest.mark.parametrize("zero_stage", [2])
def test_gates_fixed_mid_run_leave_the_inactive_blocks_and_the_scores_exactly_still(tmp_path, zero_stage):
    """DeepSpeed's optimiser keeps every parameter it was built over: under ZeRO a parameter that
    stopped requiring grad gets a zero gradient, and SGD's momentum would keep moving it. Fixed-off
    LoRA blocks (and the fixed scores) are param groups of their own at learning rate 0 instead."""
    import adapters
    import deepspeed
    from engine.config import TrainConfig
    from engine.distributed import init_distributed
    from engine.embedded import create_embedded_vit
    from engine.train import train

    init_distributed()
    torch.manual_seed(0)
    strategy = adapters.get_strategy("selective_lora", adapters.AdapterConfig(active_blocks=3))
    model = strategy.apply(create_embedded_vit(pretrained=False, num_classes=0), 10)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    cfg = TrainConfig(steps=6, eval_every=6, batch_size=4, warmup_steps=0, lr=0.5, zero_stage=zero_stage)
    frozen = {}

    def values(names):
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters([params[n] for n in names]) if zero_stage == 3 else contextlib.nullcontext():
            return {n: params[n].detach().clone() for n in names}

    on_step = strategy.on_step

    def fix_and_record(module, step, total, gather):
        on_step(module, step, total, gather)
        if strategy.fixed and not frozen:  # the step the gates were fixed at
            names = [n for n, p in model.named_parameters() if ".lora_" in n and not p.requires_grad]
            frozen.update(values(names))

    strategy.on_step = fix_and_record
    train(model, strategy, batches, batches[:1], cfg, torch.device("cpu"), tmp_path, lambda *a: None, progress=False)
    assert frozen and any(".lora_a." in n for n in frozen) and any(".lora_score." in n for n in frozen)
    after = values(list(frozen))
    moved = [n for n in frozen if not torch.equal(frozen[n], after[n])]
    assert not moved, moved[:3]
