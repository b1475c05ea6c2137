"""Linear probing over cached features (engine.feature_cache): the same run as recomputing the
frozen backbone every step, within float tolerance; the same batches as the training loader."""
import csv
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.data import Preprocess, Split
from engine.data.bad_images import BadImages
from engine.data.torch_loader import TorchLoader
from engine.feature_cache import FeatureLoader
from engine.run import main

QUICK = ["--strategy", "linear", "--steps", "6", "--eval-every", "3", "--batch-size", "16", "train.log_every=1",
         "data.knn_train_limit=300", "data.knn_test_limit=100", "data.workers=0", "eval.knn_curve_limit=0", "eval.throughput_iters=0",
         "data.loader=torch", "data.crop_scale_min=1", "data.hflip=0"]


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train_loss"]), r["val_top1"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cached")
    # a full checkpoint at steps 3 and 6, both kept: the resume test starts from the first
    assert main([*QUICK, "--out", str(out), "--name", "cached", "train.checkpoint_every=3",
                 "train.keep_checkpoints=2"]) == 0  # on by default here
    return out / "cached"


def test_cached_features_train_the_head_as_recomputing_does(cached_run, tmp_path, capsys):
    assert main([*QUICK, "--out", str(tmp_path), "--name", "recomputed", "train.cache_features=false"]) == 0
    assert "cached features of" not in capsys.readouterr().out
    cached, recomputed = _losses(cached_run), _losses(tmp_path / "recomputed")
    assert [s for s, _, _ in cached] == [s for s, _, _ in recomputed] == [1, 2, 3, 4, 5, 6]
    assert [l for _, l, _ in cached] == pytest.approx([l for _, l, _ in recomputed], rel=1e-5, abs=1e-6)
    assert [v for _, _, v in cached] == [v for _, _, v in recomputed]
    heads = [load_file(run / "adapter" / "adapter.safetensors") for run in (cached_run, tmp_path / "recomputed")]
    assert sorted(heads[0]) == sorted(heads[1]) == ["head.bias", "head.weight"]
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-5, atol=1e-6)


def test_a_cached_run_resumes_where_its_checkpoint_left_off(cached_run, tmp_path, capsys):
    """The run cut back to its step-3 checkpoint and resumed: the cache is rebuilt, the same rows follow."""
    cut = tmp_path / "cut"
    shutil.copytree(cached_run, cut)
    (cut / "results.json").unlink()
    shutil.rmtree(cut / "checkpoints" / "full" / "step-00000006")
    assert main(["--resume", str(cut)]) == 0
    assert "cached features of" in capsys.readouterr().out
    assert _losses(cut) == _losses(cached_run)
    for name in ("adapter/adapter.safetensors", "checkpoints/best/adapter.safetensors"):
        resumed, whole = load_file(cut / name), load_file(cached_run / name)
        assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_feature_loader_deals_the_training_loaders_batches():
    """Same samples per batch, epoch and rank as the torch training loader, also from start_at."""
    n, batch = 37, 4
    labels = np.arange(n)  # a label per sample: the batches' labels name their samples
    split = Split(labels=labels, images=np.zeros((n, 8, 8, 3), dtype=np.uint8))
    pre = Preprocess(input_size=8, mean=(0.5,) * 3, std=(0.5,) * 3, train_scale=(1.0, 1.0), hflip=0.0)
    for rank, world in ((0, 1), (1, 2)):
        torch_loader = TorchLoader(split, pre, train=True, batch_size=batch, seed=3, workers=0, rank=rank, world=world,
                                   device=torch.device("cpu"), dtype=torch.float32, bad_images=BadImages())
        cached = FeatureLoader(torch.arange(n, dtype=torch.float32)[:, None], torch.as_tensor(labels),
                               torch.ones(n, dtype=torch.bool), batch_size=batch, seed=3, rank=rank, world=world)
        assert len(cached) == len(torch_loader)
        for loader in (torch_loader, cached):
            loader.start_at(1, 2)
        expected = [y.tolist() for _, y in torch_loader] + [y.tolist() for _, y in torch_loader]
        got = [(x[:, 0].long().tolist(), y.tolist()) for x, y in list(cached) + list(cached)]
        assert [y for _, y in got] == expected and all(x == y for x, y in got)


def test_unreadable_samples_are_left_out_of_their_batch():
    cached = FeatureLoader(torch.arange(8.0)[:, None], torch.arange(8), torch.arange(8) % 3 != 0, batch_size=4,
                           seed=0, rank=0, world=1)
    seen = sorted(i for _, y in cached for i in y.tolist())
    assert seen == [1, 2, 4, 5, 7]


@pytest.mark.parametrize("args, message", [
    (["--strategy", "lora", "train.cache_features=true"], "train.cache_features=true needs --strategy linear"),
    (["--strategy", "linear", "train.cache_features=true"], "train.cache_features=true needs augmentation off"),
])
def test_cache_features_it_cannot_honour_is_one_line(tmp_path, capsys, args, message):
    assert main(["--steps", "2", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")
    assert not any(tmp_path.iterdir())
