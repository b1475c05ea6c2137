"""What holds by construction, on the embedded default: linear probing forgets nothing (after = before,
a flat forgetting curve), block expansion and LoRA change no logit at initialisation, and selective LoRA
with every gate off leaves the source features exactly as they were."""
import copy
import csv
import json

import pytest
import torch

import adapters
from engine.embedded import create_embedded_vit
from engine.models import features
from engine.run import main

from test_run import GOLDEN_LINEAR_LOSSES, QUICK

CURVE = ["--knn-steps", "0,1,2,3,4", "eval.knn_curve_limit=60"]  # after QUICK: the curve on, every step


@pytest.fixture(scope="module")
def linear_curve_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("findings")
    assert main([*QUICK, *CURVE, "--strategy", "linear", "--eval-every", "1", "--out", str(out), "--name", "lin"]) == 0
    with open(out / "lin" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return out / "lin", rows


def test_linear_probing_forgets_nothing_and_its_curve_is_flat(linear_curve_run):
    run_dir, rows = linear_curve_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["source_knn_after"] == results["source_knn_before"]
    curve = [(int(r["step"]), float(r["source_knn"])) for r in rows if r["source_knn"]]
    assert [s for s, _ in curve] == [0, 1, 2, 3, 4]
    assert len({v for _, v in curve}) == 1


def test_measuring_the_curve_changes_nothing_in_training(linear_curve_run):
    """The curve's extractions draw no random number and touch no weight: the golden losses still hold."""
    _, rows = linear_curve_run
    assert [float(r["train_loss"]) for r in rows if r["train_loss"]] == pytest.approx(GOLDEN_LINEAR_LOSSES, rel=1e-4)


def _with_head_of(model, reference):
    model.head.load_state_dict(reference.head.state_dict())
    return model.eval()


@pytest.mark.parametrize("strategy", ["block_expansion", "lora", "selective_lora"])
def test_at_initialisation_the_strategy_changes_no_logit(strategy):
    backbone = create_embedded_vit()
    probe = adapters.get_strategy("linear", adapters.AdapterConfig()).apply(copy.deepcopy(backbone), 10).eval()
    model = _with_head_of(adapters.get_strategy(strategy, adapters.AdapterConfig()).apply(backbone, 10), probe)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), probe(x))


def test_selective_lora_with_every_gate_off_forgets_nothing():
    backbone = create_embedded_vit().eval()
    untouched = copy.deepcopy(backbone)
    strategy = adapters.get_strategy("selective_lora", adapters.AdapterConfig(sparsity_lambda=0.0))
    model = strategy.apply(backbone, 10)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for _ in range(3):  # the LoRA updates become non-zero
        loss = torch.nn.functional.cross_entropy(model.train()(torch.randn(8, 3, 32, 32, generator=gen)),
                                                 torch.randint(0, 10, (8,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_b." in n)
    with torch.no_grad():
        for module, seg in strategy._gates.values():
            module.lora_score[seg].fill_(strategy.cfg.gate_threshold - 0.01)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        expected = features(untouched, x)
        assert torch.equal(features(model.eval(), x), expected)
        finalized = strategy.finalize(model)
        assert strategy.metrics(finalized)["active_blocks"] == 0
        assert torch.equal(features(finalized, x), expected)
