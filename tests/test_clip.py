"""CLIP backbones and zero-shot retention (engine.clip_weights, engine.zeroshot), offline: a small CLIP
with random weights built by open_clip, written in OpenAI's layouts (a state dict, a TorchScript
archive) and open_clip's (a training checkpoint), loaded into a timm CLIP image tower of the same
geometry (registered here, so engine.run builds it by name)."""
import json
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import register_model

import adapters
from engine import data, zeroshot
from engine.config import ModelConfig, build_config
from engine.embedded import create_embedded_vit
from engine.errors import UserError
from engine.evaluate import top1_accuracy
from engine.curve import read_curve
from engine.interpolate import interpolation_curve
from engine.models import build_backbone, features
from engine.run import Runtime
from engine.run import main as run_main

open_clip = pytest.importorskip("open_clip")

WIDTH, LAYERS, HEADS, EMBED, SIDE = 128, 2, 2, 32, 32  # open_clip's vision heads: width // 64
MODEL = "vit_tiny_clip_test"
QUICK = ["--steps", "2", "--eval-every", "2", "--batch-size", "16", "data.knn_train_limit=60",
         "data.knn_test_limit=30", "data.workers=0", "eval.knn_curve_limit=0", "eval.throughput_iters=0",
         "eval.shift=none", "data.loader=torch"]


@register_model
def vit_tiny_clip_test(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
    """timm's CLIP ViT-B/16 image tower (pre-norm, LayerNorm eps 1e-5, CLIP's mean/std) at the tiny CLIP's geometry."""
    geometry = dict(embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS, img_size=SIDE)
    return timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False,
                             pretrained_cfg_overlay=dict(input_size=(3, SIDE, SIDE)), **{**geometry, **kwargs})


def _tiny_clip(seed=0):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    model = CLIP(EMBED, CLIPVisionCfg(layers=LAYERS, width=WIDTH, patch_size=16, image_size=SIDE),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2), quick_gelu=False)
    with torch.no_grad():  # open_clip zero-inits nothing that matters here; make the projections non-trivial
        model.visual.proj.normal_(std=WIDTH ** -0.5)
    return model.eval()


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """The tiny CLIP and its files: OpenAI's state dict, OpenAI's TorchScript archive, open_clip's
    training checkpoint, and an image tower alone (no text tower)."""
    folder = tmp_path_factory.mktemp("clip")
    model = _tiny_clip()
    state = model.state_dict()
    files = {"openai": folder / "openai.pt", "torchscript": folder / "ViT-tiny.pt",
             "open_clip": folder / "epoch_1.pt", "image_only": folder / "visual.pt"}
    torch.save(state, files["openai"])
    with warnings.catch_warnings():  # the tracer's notes on nn.MultiheadAttention's shape checks
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"encode_image": (torch.ones(1, 3, SIDE, SIDE),)}, check_trace=False)
    traced.save(str(files["torchscript"]))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, files["open_clip"])
    torch.save({k: v for k, v in state.items() if k.startswith("visual.")}, files["image_only"])
    return model, files


def _cfg(weights, *overrides):
    return build_config(overrides=[f"model.name={MODEL}", f"model.weights={weights}", *overrides])


@pytest.mark.parametrize("layout", ["openai", "torchscript", "open_clip"])
def test_loading_gives_timm_and_open_clip_the_same_image_embeddings(clip_files, layout):
    clip, files = clip_files
    backbone = build_backbone(ModelConfig(name=MODEL, weights=str(files[layout]))).eval()
    tower = zeroshot.TextTower.from_file(_cfg(files[layout]))
    images = torch.randn(6, 3, SIDE, SIDE)
    with torch.no_grad():
        ours = features(backbone, images) @ tower.projection    # timm's pre-logits @ the untouched visual.proj
        theirs = clip.encode_image(images)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert torch.equal(tower.projection, clip.visual.proj.detach())


def test_zeroshot_scoring_equals_open_clips_cosine_argmax(clip_files, tmp_path):
    clip, files = clip_files
    templates = tmp_path / "templates.txt"
    templates.write_text("# mine\na photo of a {}.\n{} in the wild\n\na drawing of the {}, small\n")
    classes = ["cat", "dog", "tiger_shark", "aeroplane", "ship", "frog"]
    tower = zeroshot.TextTower.from_file(_cfg(files["openai"], f"eval.zeroshot_templates={templates}"))
    class_emb = tower.class_embeddings(classes, zeroshot.read_templates(templates))
    images = torch.randn(64, 3, SIDE, SIDE)
    backbone = build_backbone(ModelConfig(name=MODEL, weights=str(files["openai"]))).eval()
    with torch.no_grad():  # open_clip's own recipe: unit prompt embeddings averaged per class, normalised
        prompts = [[t.replace("{}", c.replace("_", " ")) for t in ("a photo of a {}.", "{} in the wild",
                                                                    "a drawing of the {}, small")] for c in classes]
        text = torch.stack([F.normalize(F.normalize(clip.encode_text(open_clip.tokenize(p)), dim=-1).mean(0), dim=0)
                            for p in prompts])
        reference = (F.normalize(clip.encode_image(images), dim=-1) @ text.T).argmax(1)
        feats = features(backbone, images)
    assert torch.allclose(class_emb, text, atol=1e-5)
    ours = (zeroshot.image_embeddings(feats, tower.projection) @ class_emb.T).argmax(1)
    assert torch.equal(ours, reference)
    assert len(set(reference.tolist())) > 1  # not a degenerate single-class answer
    assert zeroshot.zeroshot_top1(feats, reference, tower.projection, class_emb) == 100.0


def test_head_init_zeroshot_gives_the_zero_shot_accuracy_at_step_0(clip_files, tmp_path):
    _, files = clip_files
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of the number {}.\na blurry {}\n")
    cfg = _cfg(files["torchscript"], "eval.zeroshot=digits", "model.head_init=zeroshot", "data.workers=0",
               "data.loader=torch", "strategy=lora", f"eval.zeroshot_templates={templates}")
    rt = Runtime(0, 1, torch.device("cpu"))
    backbone = build_backbone(cfg.model).eval()
    pre = data.Preprocess.from_model(backbone)
    target = data.load_domain("digits")
    zs = zeroshot.for_run(cfg, pre, rt, target.classes, 10)
    score, head = zs.score, zs.head
    before = score(backbone)
    model = adapters.get_strategy("lora", cfg.adapter).apply(backbone, 10)
    zeroshot.start_head(model, head, tmp_path)  # RUN/zeroshot_head.safetensors
    test = data.make_loader(target.test, pre, train=False, batch_size=128, loader="torch")
    step0 = top1_accuracy(model, test, torch.device("cpu"), progress=False)
    assert step0 == before["digits"] == before["mean"]
    images = torch.randn(64, 3, SIDE, SIDE)  # and image by image, where a random CLIP's answers vary
    with torch.no_grad():
        head_says = model(images).argmax(1)
        feats = features(backbone, images)
    tower = zeroshot.TextTower.from_file(cfg)
    class_emb = tower.class_embeddings(target.classes, zeroshot.read_templates(templates))
    zero_shot_says = (zeroshot.image_embeddings(feats, tower.projection) @ class_emb.T).argmax(1)
    assert torch.equal(head_says, zero_shot_says) and len(set(head_says.tolist())) > 1
    assert torch.equal(zeroshot.initial_head(cfg, tmp_path)["head.weight"], model.head.weight.detach())


@pytest.fixture(scope="module")
def clip_runs(clip_files, tmp_path_factory):
    """A run's arguments on the tiny CLIP (zero-shot on two sets, one template: CLIP's 80 cost more than
    the rest of the run), and a finished linear probe from the zero-shot head."""
    _, files = clip_files
    folder = tmp_path_factory.mktemp("clip-runs")
    templates = folder / "templates.txt"
    templates.write_text("a photo of the number {}.\n")
    common = [*QUICK, "--model", MODEL, "--weights", str(files["open_clip"]), "--out", str(folder),
              "eval.zeroshot=digits,digits-inverted", f"eval.zeroshot_templates={templates}"]
    assert run_main(["--strategy", "linear", "--name", "linear", *common, "model.head_init=zeroshot"]) == 0
    return folder, common


def test_a_run_records_zero_shot_before_and_after_and_linear_probing_keeps_it(clip_runs):
    folder, _ = clip_runs
    linear = json.loads((folder / "linear" / "results.json").read_text())
    assert set(linear["zeroshot_before"]) == {"digits", "digits-inverted", "mean"}
    assert linear["zeroshot_after"] == linear["zeroshot_before"]  # the backbone did not move
    assert linear["zeroshot_forgetting"] == 0
    assert (folder / "linear" / zeroshot.HEAD_FILE).is_file()


def test_full_fine_tuning_moves_the_zero_shot_accuracy(clip_runs):
    folder, common = clip_runs
    linear = json.loads((folder / "linear" / "results.json").read_text())
    assert run_main(["--strategy", "full", "--name", "full", *common, "--lr", "0.5"]) == 0
    full = json.loads((folder / "full" / "results.json").read_text())
    assert full["zeroshot_before"] == linear["zeroshot_before"]  # the same untouched image tower
    assert full["zeroshot_after"] != full["zeroshot_before"]
    mean = full["zeroshot_before"]["mean"] - full["zeroshot_after"]["mean"]
    assert full["zeroshot_forgetting"] == pytest.approx(mean, abs=1e-3)


def test_the_forgetting_curve_carries_zero_shot_at_its_steps(clip_runs):
    """metrics.csv's zeroshot column at every curve step: at step 0 the untouched tower's zero-shot mean,
    at the last step (the best checkpoint's) the run's zeroshot_after, where the curve's cap holds every
    test image; zeroshot.png drawn; the curve's time counts it."""
    folder, common = clip_runs
    assert run_main(["--strategy", "full", "--name", "curve", *common, "--lr", "0.5", "eval.knn_curve_limit=5000",
                     "eval.knn_steps=0-2"]) == 0
    run = folder / "curve"
    results = json.loads((run / "results.json").read_text())
    assert [step for step, _ in read_curve(run / "metrics.csv")] == [0, 1, 2]
    curve = read_curve(run / "metrics.csv", "zeroshot")
    assert [step for step, _ in curve] == [0, 1, 2]
    assert curve[0][1] == pytest.approx(results["zeroshot_before"]["mean"], abs=1e-4)
    assert curve[2][1] == pytest.approx(results["zeroshot_after"]["mean"], abs=1e-4)
    assert curve[2][1] != curve[0][1]  # lr 0.5 moved it
    assert (run / "zeroshot.png").stat().st_size > 0


def test_a_curve_capped_below_the_zero_shot_sets_scores_a_class_balanced_subset(clip_files, tmp_path):
    from engine.evaluate import extract_features
    _, files = clip_files
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of the number {}.\n")
    cfg = _cfg(files["open_clip"], "eval.zeroshot=digits", "data.workers=0", "data.loader=torch",
               "eval.knn_curve_limit=50", f"eval.zeroshot_templates={templates}")
    rt = Runtime(0, 1, torch.device("cpu"))
    backbone = build_backbone(cfg.model).eval()
    pre = data.Preprocess.from_model(backbone)
    zs = zeroshot.for_run(cfg, pre, rt, [str(c) for c in range(10)], 10)
    digits = data.load_domain("digits")
    subset = data.capped(digits.test, 50, cfg.seed)
    assert len(subset) == 50 and torch.bincount(torch.as_tensor(subset.labels), minlength=10).min() >= 4
    feats, labels = extract_features(backbone, data.make_loader(subset, pre, train=False, batch_size=64,
                                                                loader="torch"), torch.device("cpu"), None,
                                     progress=False)
    tower = zeroshot.TextTower.from_file(cfg)
    class_emb = tower.class_embeddings(digits.classes, zeroshot.read_templates(templates))
    assert zs.curve_score(backbone)["digits"] == zeroshot.zeroshot_top1(feats, labels, tower.projection, class_emb)
    no_curve = _cfg(files["open_clip"], "eval.zeroshot=digits", "eval.knn_curve_limit=0",
                    f"eval.zeroshot_templates={templates}")
    assert zeroshot.for_run(no_curve, pre, rt, [], 10).curve_score is None


def test_the_interpolation_curve_of_a_zero_shot_headed_run_carries_zero_shot(clip_runs):
    folder, _ = clip_runs
    linear = json.loads((folder / "linear" / "results.json").read_text())
    ends = interpolation_curve(folder / "linear", [0, 1])  # WiSE-FT: the head moves from the zero-shot one
    assert [row["zeroshot_mean"] for row in ends] == pytest.approx([linear["zeroshot_before"]["mean"]] * 2, abs=1e-3)
    assert ends[1]["target_top1"] == pytest.approx(linear["target_top1"], abs=1e-3)


def test_zero_shot_on_a_backbone_that_is_not_clip_is_refused_in_one_line(capsys):
    assert run_main([*QUICK, "eval.zeroshot=digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CLIP backbone" in err and "--model embedded is not one" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="model.head_init=zeroshot needs CLIP's text tower: give --weights"):
        build_config(overrides=[f"model.name={MODEL}", "model.head_init=zeroshot"])


def test_a_weights_file_without_a_text_tower_is_refused_before_the_run_folder(clip_files, tmp_path, capsys):
    _, files = clip_files
    assert run_main([*QUICK, "--model", MODEL, "--weights", str(files["image_only"]), "--out", str(tmp_path),
                     "eval.zeroshot=digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "visual.pt holds no text tower" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing claimed


def test_a_weights_file_that_is_not_clip_is_refused_for_zero_shot(tmp_path):
    path = tmp_path / "embedded.pt"
    torch.save(create_embedded_vit(pretrained=False, num_classes=0).state_dict(), path)
    with pytest.raises(UserError, match="embedded.pt is not a CLIP checkpoint"):
        zeroshot.TextTower.from_file(_cfg(path))


@pytest.mark.parametrize("text, says", [("a photo of a cat\n", "without {}"), ("# nothing\n", "holds no template")])
def test_a_bad_templates_file_is_refused_by_the_config(tmp_path, text, says):
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(UserError, match=says):
        build_config(overrides=[f"eval.zeroshot_templates={path}"])
    with pytest.raises(UserError, match="does not exist"):
        build_config(overrides=[f"eval.zeroshot_templates={tmp_path / 'missing.txt'}"])


def test_the_default_templates_are_clips_80():
    templates = zeroshot.read_templates()
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."


def test_an_unknown_zero_shot_data_set_is_refused_by_the_config():
    with pytest.raises(UserError, match="unknown data set 'imagenet'"):
        build_config(overrides=["eval.zeroshot=imagenet"])


def test_the_clip_preset_lists_its_rows_at_their_rates_and_needs_the_weights(tmp_path, capsys):
    from engine.sweep import main as sweep_main
    source = "data.source=imagefolder:/data/imagenet"
    assert sweep_main(["--preset", "clip", "--dry-run", "--out", str(tmp_path), source]) == 2
    assert "needs CLIP's text tower" in capsys.readouterr().err
    weights = "model.weights=ViT-B-16.pt"
    assert sweep_main(["--preset", "clip", "--dry-run", "--out", str(tmp_path), source, weights]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("21 runs:")  # 7 rows (6 trained, WiSE-FT derived from All) x 3 learning rates
    names = {line.split()[1].rstrip(":") for line in lines if line.startswith("[new] ")}
    assert {n.rsplit("-lr", 1)[0] for n in names} == {"full", "linear", "lora-r8", "lora-r128", "selective-r128-6pct",
                                                      "selective-r128-12pct", "wise-ft"}
    assert any("--active-fraction 0.0625" in line and "model.head_init=zeroshot" in line for line in lines)


def test_dry_run_counts_a_clip_vit_b16_exactly(capsys):
    from engine.run import main as run
    assert run(["--model", "vit_base_patch16_clip_224", "--num-classes", "100", "--strategy", "lora", "--dry-run",
                "--json"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # LoRA r=8 on q and v: 12 blocks x 2 x (8 x 768 + 768 x 8), plus the head 768 x 100 + 100
    assert counts["trainable_params"] == 12 * 2 * (8 * 768 + 768 * 8) + 768 * 100 + 100 == 371_812
    # the tower: DINO's ViT-B/16 (85,798,656 without a head) + ln_pre (1,536) - the patch embedding's bias (768)
    assert counts["total_params"] - counts["trainable_params"] + 768 * 100 + 100 == 85_876_324


def test_the_sweep_draws_each_rows_zero_shot_curve_where_its_runs_measured_it(tmp_path):
    from engine.presets import CLIP
    from engine.sweep import build_grid
    from engine.sweep_report import select, write_report
    from test_sweep import fake_run
    grid = build_grid((CLIP.row("full"), CLIP.row("linear")), [0], lrs=(1e-5,))
    for p in grid:
        fake_run(tmp_path / p.name, p.row.strategy, 50.0, 60.0, 70.0, 1000)
        if p.row.key == "full":
            (tmp_path / p.name / "metrics.csv").write_text(
                "step,train_loss,source_knn,zeroshot\n0,,90,64.5\n1,2.3,80,61.25\n2,2.1,,\n")
    write_report(tmp_path, grid, CLIP)
    rows, _ = select(grid, tmp_path)
    assert [f.zeroshot_curve for r in rows for f in r["runs"]] == [[(0, 64.5), (1, 61.25)], []]
    assert (tmp_path / "zeroshot.png").stat().st_size > 0
