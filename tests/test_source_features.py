"""engine.source_features: the untouched backbone's source features, extracted once per (weights, data
listing, preprocessing, ...) and reused: the before-accuracy and the curve's step 0 from the cache equal
recomputing them exactly; a corrupted or mismatching file is recomputed, never trusted."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine import data, source_features
from engine.config import ModelConfig, RunConfig
from engine.curve import ForgettingCurve
from engine.evaluate import extract_features
from engine.models import build_backbone
from engine.run import Runtime, measure_source

CPU = torch.device("cpu")


def split(n, seed):
    rng = np.random.default_rng(seed)
    return data.Split(labels=np.arange(n) % 4, images=rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8))


@pytest.fixture
def run(tmp_path):
    """An embedded backbone, its k-NN and curve loaders over small random splits, a config writing to tmp_path."""
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(pretrained=False))
    pre = data.Preprocess.from_model(backbone)
    cfg = RunConfig(out=str(tmp_path))
    cfg.data.loader, cfg.train.steps, cfg.eval.batch_size = "torch", 4, 16

    def loader(s):
        return data.make_loader(s, pre, train=False, batch_size=16, loader="torch", workers=0, device=CPU)
    bank, query = split(48, 1), split(24, 2)
    loaders = SimpleNamespace(knn_bank=loader(bank), knn_query=loader(query), curve_bank=loader(split(20, 3)),
                              curve_query=loader(split(12, 4)))
    return SimpleNamespace(backbone=backbone, pre=pre, cfg=cfg, loaders=loaders, rt=Runtime(0, 1, CPU),
                           folder=tmp_path / source_features.FOLDER)


def untouched(run, capsys):
    knn, curve = source_features.measure_untouched(run.backbone, run.loaders, run.cfg, 4, run.rt, run.pre,
                                                   measure_source)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("source features:")]
    assert len(lines) == 1
    return knn, curve, lines[0]


def test_the_reused_before_accuracy_and_curve_features_equal_recomputing_them(run, capsys):
    first, first_curve, said = untouched(run, capsys)
    assert said.startswith("source features: extracted k-NN bank (48), k-NN queries (24), curve bank (20), "
                           "curve queries (12); cached in ")
    assert len(list(run.folder.glob("*.safetensors"))) == 4
    again, again_curve, said = untouched(run, capsys)
    assert said.startswith(f"source features: reused the untouched backbone's k-NN bank (48), k-NN queries (24), "
                           f"curve bank (20), curve queries (12) from {run.folder} (extracted by an earlier run")
    recomputed = measure_source(run.backbone, run.loaders, run.cfg, 4, run.rt)
    assert again == first == recomputed  # exactly, every k
    bank, bank_y = extract_features(run.backbone, run.loaders.curve_bank, CPU, progress=False)
    assert torch.equal(again_curve[0], bank) and torch.equal(again_curve[1], bank_y)
    assert all(torch.equal(a, b) for a, b in zip(first_curve, again_curve))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "another key's file"])
def test_a_corrupted_or_mismatching_cache_file_is_recomputed_and_rewritten(run, capsys, damage):
    first, _, _ = untouched(run, capsys)
    cache = source_features.open_cache(run.backbone, run.cfg, run.pre, CPU, run.cfg.out)
    path = run.folder / f"{cache.key(run.loaders.knn_bank.loader.dataset.split)}.safetensors"
    raw = bytearray(path.read_bytes())
    if damage == "flip a byte":
        raw[-5] ^= 0xFF  # inside the tensors: the header still parses, the content hash does not match
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[:len(raw) // 2]))
    else:  # a valid file of the queries under the bank's name
        query_key = cache.key(run.loaders.knn_query.loader.dataset.split)
        path.write_bytes((run.folder / f"{query_key}.safetensors").read_bytes())
    again, _, said = untouched(run, capsys)
    assert said.startswith("source features: reused k-NN queries (24), curve bank (20), curve queries (12) from ")
    assert said.endswith("; extracted k-NN bank (48)")
    assert again == first
    assert cache.load(path.stem, run.loaders.knn_bank.loader.dataset.split) is not None  # written whole again


def test_other_weights_or_another_listing_get_another_key(run, tmp_path):
    cache = source_features.open_cache(run.backbone, run.cfg, run.pre, CPU, run.cfg.out)
    bank = run.loaders.knn_bank.loader.dataset.split
    with torch.no_grad():
        next(run.backbone.parameters()).view(-1)[0] += 1e-3
    changed = source_features.open_cache(run.backbone, run.cfg, run.pre, CPU, run.cfg.out)
    assert changed.weights != cache.weights and changed.key(bank) != cache.key(bank)
    relabelled = data.Split(labels=bank.labels[::-1].copy(), images=bank.images)
    assert cache.key(relabelled) != cache.key(bank)
    files = []
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"x" * (i + 1))
        files.append(str(tmp_path / f"{i}.png"))
    listed = data.Split(labels=np.arange(3), paths=files)
    before = source_features.split_digest(listed)
    os.utime(files[1], ns=(1, 1))  # touched: the file may have changed
    assert source_features.split_digest(listed) != before


def test_the_curve_scores_the_untouched_features_at_step_0_and_extracts_after(run):
    curve = ForgettingCurve([0, 1], run.loaders.curve_bank, run.loaders.curve_query, ks=[5], report_k=5,
                            temperature=0.07, num_classes=4, device=CPU)
    live = curve.measure(run.backbone) if curve.due(0) else None
    bank, bank_y = extract_features(run.backbone, run.loaders.curve_bank, CPU, progress=False)
    query, query_y = extract_features(run.backbone, run.loaders.curve_query, CPU, progress=False)
    curve.untouched = (bank, bank_y, query, query_y)

    class Untouchable(torch.nn.Module):
        def forward_features(self, x):
            raise AssertionError("step 0 must not extract")

        forward_head = forward = forward_features

    assert curve.due(0) and curve.measure(Untouchable()) == live
    assert curve.due(1)
    with pytest.raises(AssertionError, match="must not extract"):
        curve.measure(Untouchable())


def test_with_the_cache_off_a_run_extracts_and_writes_nothing(run, capsys):
    run.cfg.eval.source_cache = False
    knn, curve = source_features.measure_untouched(run.backbone, run.loaders, run.cfg, 4, run.rt, run.pre,
                                                   measure_source)
    assert knn == measure_source(run.backbone, run.loaders, run.cfg, 4, run.rt) and curve is None
    assert not run.folder.exists() and "source features:" not in capsys.readouterr().out
