"""`python -m engine.pretrain`: the recipe that rebuilds the embedded checkpoint."""
import json
import math

import torch
from safetensors.torch import load_file

from engine import pretrain as P
from engine.embedded import create_embedded_vit

TINY = dict(steps=3, batch_size=16, warmup_steps=1, n_train=64, n_test=32, threads=1, knn_k=5)


def test_pretrain_writes_a_headless_checkpoint_that_loads_back(tmp_path):
    out = tmp_path / "vit.safetensors"
    threads = torch.get_num_threads()
    provenance = P.pretrain(P.PretrainConfig(**TINY), out, progress=False)
    assert torch.get_num_threads() == threads  # the caller's setting survives
    state = load_file(str(out))
    assert not any(k.startswith("head.") for k in state)
    model = create_embedded_vit(pretrained=False)
    model.load_state_dict(state, strict=True)
    written = json.loads(out.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(provenance))
    assert written["config"]["seed"] == 0 and written["config"]["steps"] == 3
    assert written["params"] == sum(v.numel() for v in state.values())
    assert 0.0 <= written["source_knn5"] <= 100.0
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_pretrain_is_reproducible_from_the_seed(tmp_path):
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    P.pretrain(P.PretrainConfig(**TINY), a, progress=False)
    P.pretrain(P.PretrainConfig(**TINY), b, progress=False)
    P.pretrain(P.PretrainConfig(**dict(TINY, seed=1)), c, progress=False)
    sa, sb, sc = (load_file(str(p)) for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])


def test_cli_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    code = P.main(["--steps", "2", "--batch-size", "8", "--warmup-steps", "1", "--n-train", "40",
                   "--n-test", "20", "--threads", "1", "--out", str(out)])
    assert code == 0 and out.is_file() and out.with_suffix(".json").is_file()
    assert "20-NN accuracy" in capsys.readouterr().out


def test_full_scale_crop_is_the_image_or_its_mirror():
    images = torch.rand(8, 3, 32, 32)
    out = P.random_resized_crop_flip(images, (1.0, 1.0), torch.Generator().manual_seed(0), ratio=(1.0, 1.0))
    for x, y in zip(images, out):
        assert torch.allclose(y, x, atol=1e-5) or torch.allclose(y, x.flip(-1), atol=1e-5)


def test_crops_zoom_in_and_stay_inside_the_image():
    # A horizontal ramp: any crop of half the width spans at most half the ramp's range.
    ramp = torch.linspace(0, 1, 32).expand(4, 3, 32, 32).contiguous()
    out = P.random_resized_crop_flip(ramp, (0.25, 0.25), torch.Generator().manual_seed(0), ratio=(1.0, 1.0))
    span = out[:, 0, 0].amax(dim=1) - out[:, 0, 0].amin(dim=1)
    assert torch.all(span < 0.55) and out.min() >= 0 and out.max() <= 1


def test_schedule_warms_up_linearly_then_decays_to_zero():
    lr = [P._warmup_cosine(s, 10, 100) for s in range(100)]
    assert lr[0] == 0.1 and lr[9] == 1.0 and lr[10] == 1.0
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert math.isclose(P._warmup_cosine(100, 10, 100), 0.0, abs_tol=1e-12)
