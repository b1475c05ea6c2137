"""The weight-interpolation curve (engine.interpolate): the pure interpolation of two state dicts, what
theta_0 is for LoRA and block expansion, and the curve of a finished embedded run, whose ends are the
run's own results exactly."""
import copy
import csv
import json

import pytest
import torch

import adapters
from engine.embedded import create_embedded_vit
from engine.interpolate import interpolate, main, parse_alphas
from engine.errors import UserError
from engine.models import features
from engine.run import main as run_main

QUICK = ["--steps", "4", "--eval-every", "2", "--batch-size", "16", "data.knn_train_limit=100",
         "data.knn_test_limit=50", "data.workers=0", "eval.knn_curve_limit=0", "eval.throughput_iters=0"]


def test_interpolation_is_exact_at_both_ends_and_linear_between():
    theta0 = {"w": torch.tensor([0.1, 2.0]), "head.weight": torch.tensor([1.0]), "steps": torch.tensor([3])}
    theta1 = {"w": torch.tensor([0.3, -2.0]), "head.weight": torch.tensor([5.0]), "steps": torch.tensor([7])}
    assert all(torch.equal(interpolate(theta0, theta1, 0)[k], v) for k, v in theta0.items() if k == "w")
    assert all(torch.equal(interpolate(theta0, theta1, 1)[k], v) for k, v in theta1.items())
    mid = interpolate(theta0, theta1, 0.25)
    assert torch.allclose(mid["w"], torch.tensor([0.15, 1.0]))
    assert mid["head.weight"].item() == 5.0 and mid["steps"].item() == 7  # the head and integers: theta_1's
    assert interpolate(theta0, theta1, 0.25, keep=())["head.weight"].item() == 2.0  # a head that moves too
    with pytest.raises(ValueError, match="differ in their tensors"):
        interpolate(theta0, {"w": theta1["w"]}, 0.5)


def _ends(strategy_name, **options):
    """theta_1 (trained tensors perturbed) and theta_0 (the strategy on the untouched backbone), both finalised."""
    torch.manual_seed(0)
    cfg = adapters.AdapterConfig(**options)
    trained = adapters.get_strategy(strategy_name, cfg).apply(create_embedded_vit(), 10)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    fresh = adapters.get_strategy(strategy_name, cfg)
    start = fresh.apply(create_embedded_vit(), 10)
    return trained, fresh.finalize(start), adapters.get_strategy(strategy_name, cfg).finalize(copy.deepcopy(trained))


def test_for_lora_alpha_scales_the_low_rank_delta():
    trained, start, end = _ends("lora", lora_rank=4)
    qkv = trained.blocks[2].attn.qkv
    mid = interpolate(start.state_dict(), end.state_dict(), 0.5)["blocks.2.attn.qkv.weight"]
    expected = qkv.weight.detach().clone()
    expected[:128] += 0.5 * qkv.delta_weight("q").detach()    # q: the first third of qkv's rows
    expected[256:] += 0.5 * qkv.delta_weight("v").detach()    # v: the last (k untouched)
    assert torch.allclose(mid, expected, atol=1e-6)
    assert torch.equal(interpolate(start.state_dict(), end.state_dict(), 0)["blocks.2.attn.qkv.weight"], qkv.weight)


def test_for_block_expansion_alpha_0_is_the_untouched_backbone_exactly():
    _, start, end = _ends("block_expansion", blocks=2)
    model = copy.deepcopy(end)
    model.load_state_dict(interpolate(start.state_dict(), end.state_dict(), 0))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(features(model.eval(), images), features(create_embedded_vit().eval(), images))


def test_alphas_parse_and_bad_ones_are_refused():
    assert parse_alphas("1,0,0.5,0.5") == [0.0, 0.5, 1.0]
    for bad in ("a,b", "", "nan"):
        with pytest.raises(UserError, match="--alphas"):
            parse_alphas(bad)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert run_main([*QUICK, "--strategy", "lora", "--out", str(out), "--name", "lora",
                     "eval.shift=corrupt:contrast@5"]) == 0
    return out / "lora"


def test_the_curve_of_a_run_ends_in_the_runs_own_results(lora_run, capsys):
    assert main([str(lora_run), "--alphas", "1,0"]) == 0
    results = json.loads((lora_run / "results.json").read_text())
    with open(lora_run / "interpolation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["alpha"]) for r in rows] == [0, 1]
    assert float(rows[0]["source_knn"]) == results["source_knn_before"]
    assert float(rows[-1]["source_knn"]) == results["source_knn_after"]
    assert float(rows[-1]["target_top1"]) == results["target_top1"]
    assert float(rows[-1]["shift_top1[corrupt:contrast@5]"]) == results["shift_top1"]["corrupt:contrast@5"]
    assert float(rows[-1]["target_shift_top1"]) == results["target_shift_top1"]
    assert (lora_run / "interpolation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "target_top1" in capsys.readouterr().out


def test_bad_input_is_refused_in_one_line(lora_run, tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path} is not a finished run folder: it has no config.yaml\n"
    assert main([str(lora_run), "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'train.lr=1': engine.interpolate takes key=value for eval.") and err.count("\n") == 1
