"""The optimiser: timm's names, decay-exempt groups, layer decay, learning-rate scaling, refusals."""
import dataclasses
import math
import re
import warnings

import pytest
import timm.optim
import torch
from timm.models.vision_transformer import VisionTransformer

import adapters
from adapters import AdapterConfig
from engine import optim
from engine.config import TrainConfig, build_config, resolved_for_target
from engine.errors import UserError


def model_with(strategy="full", depth=2, seed=0, **options):
    """A tiny random timm ViT (16 px, 4 patches) with `strategy` applied and a 3-class head."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=depth, num_heads=2, num_classes=0)
    return adapters.get_strategy(strategy, AdapterConfig(**options)).apply(vit, 3).train()


def train_cfg(**kwargs):
    return dataclasses.replace(TrainConfig(), **kwargs)


def steps(model, optimizer, n=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def names_of(model, params):
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_the_choices_are_timms_names_without_the_second_order_ones():
    listed = timm.optim.list_optimizers()
    assert set(optim.OPTIMIZERS) == {n for n in listed if not timm.optim.get_optimizer_info(n).second_order}
    assert {"sgd", "adamw", "lamb", "lars"} <= set(optim.OPTIMIZERS) and "adahessian" not in optim.OPTIMIZERS


def test_default_sgd_is_the_torch_sgd_the_engine_always_built():
    """Same class, one group, the same parameters in the same order, classical momentum 0.9, no
    decay; and three steps leave bit-identical weights."""
    model = model_with("lora")
    reference_model = model_with("lora")
    opt = optim.make_optimizer(model, TrainConfig())
    reference = torch.optim.SGD([p for p in reference_model.parameters() if p.requires_grad], lr=0.05,
                                momentum=0.9, weight_decay=0.0)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    group, ref_group = opt.param_groups[0], reference.param_groups[0]
    assert names_of(model, group["params"]) == names_of(reference_model, ref_group["params"])
    assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in ref_group.items() if k != "params"}
    steps(model, opt, 3)
    steps(reference_model, reference, 3)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_builds_and_takes_two_steps(name):
    try:
        timm.optim.get_optimizer_class(name)
    except (AssertionError, ImportError) as e:  # APEX and bitsandbytes need CUDA
        pytest.skip(str(e))
    model = model_with("full")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Eager: the optimiser's maths, without Kron's torch.compile (a minute on this CPU).
    with warnings.catch_warnings(), torch.compiler.set_stance("force_eager"):
        warnings.simplefilter("ignore")  # kron: 'opt_einsum is recommended'
        opt = optim.make_optimizer(model, train_cfg(optimizer=name, lr=0.01, weight_decay=0.01))
        steps(model, opt, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.head.weight, before["head.weight"])


def test_weight_decay_spares_biases_norms_gate_scores_position_embedding_and_class_token():
    model = model_with("full")
    groups = optim.param_groups(model, train_cfg(weight_decay=0.05))
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in names_of(model, g["params"])}
    exempt = {n for g in groups if g["weight_decay"] == 0 for n in names_of(model, g["params"])}
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2 and n not in ("pos_embed", "cls_token")}
    assert {"pos_embed", "cls_token", "head.bias", "norm.weight", "blocks.0.norm1.bias"} <= exempt
    assert decayed | exempt == {n for n, _ in model.named_parameters()} and not decayed & exempt

    model = model_with("selective_lora")
    groups = optim.param_groups(model, train_cfg(weight_decay=0.05))
    exempt = {n for g in groups if g["weight_decay"] == 0 for n in names_of(model, g["params"])}
    scores = {n for n, _ in model.named_parameters() if ".lora_score." in n}
    assert scores and scores <= exempt
    assert not any(".lora_a." in n or ".lora_b." in n for n in exempt)


@pytest.mark.parametrize("strategy", ["lora", "top_k", "block_expansion"])
def test_only_trainable_parameters_reach_the_optimizer(strategy):
    model = model_with(strategy, top_k=1, blocks=1)
    opt = optim.make_optimizer(model, train_cfg(optimizer="adamw", weight_decay=0.05))
    given = [n for g in opt.param_groups for n in names_of(model, g["params"])]
    assert sorted(given) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_layer_decay_scales_each_blocks_rate_by_its_depth():
    """BEiT's rule on N = 3 blocks: blocks.i at d^(3 - i) (the final norm with the top block), the
    embeddings at d^4, the head at the full rate."""
    model = model_with("full", depth=3)
    d = 0.5
    opt = optim.make_optimizer(model, train_cfg(lr=0.1, layer_decay=d))
    lr_of = {n: g["lr"] for g in opt.param_groups for n in names_of(model, g["params"])}
    assert lr_of["head.weight"] == lr_of["head.bias"] == pytest.approx(0.1)
    assert lr_of["norm.weight"] == pytest.approx(0.1 * d)
    for i in range(3):
        assert lr_of[f"blocks.{i}.mlp.fc1.weight"] == pytest.approx(0.1 * d ** (3 - i))
    assert lr_of["pos_embed"] == lr_of["patch_embed.proj.weight"] == pytest.approx(0.1 * d ** 4)
    # LambdaLR scales every group's own rate: the warm-up keeps the ratios.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, optim.lr_lambda(train_cfg(warmup_steps=4)))
    assert max(scheduler.get_last_lr()) == pytest.approx(0.1 / 4)
    assert min(scheduler.get_last_lr()) == pytest.approx(0.1 * d ** 4 / 4)


def test_layer_decay_is_refused_where_everything_that_trains_is_in_one_layer():
    with pytest.raises(UserError, match="layer_decay has no effect"):
        optim.check_optimizer(model_with("linear"), train_cfg(layer_decay=0.65))
    optim.check_optimizer(model_with("top_k", top_k=1), train_cfg(layer_decay=0.65))  # a block and the head


@pytest.mark.parametrize("scale, batch, expected", [
    ("none", 4096, 0.05), ("linear", 4096, 0.8), ("linear", 128, 0.025), ("sqrt", 4096, 0.2), ("sqrt", 64, 0.025)])
def test_lr_scaling_follows_the_global_batch(scale, batch, expected):
    cfg = train_cfg(lr=0.05, base_batch=256, batch_size=batch, lr_scale=scale)
    assert optim.resolved_lr(cfg) == pytest.approx(expected, rel=1e-12)
    opt = optim.make_optimizer(model_with("linear"), cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_the_resolved_lr_goes_into_the_run_config():
    cfg = build_config(overrides=["train.lr=0.05", "train.batch_size=4096", "train.lr_scale=linear"])
    assert resolved_for_target(cfg, 0.5, 0.5).train.lr_resolved == pytest.approx(0.8)
    assert resolved_for_target(build_config(), 0.5, 0.5).train.lr_resolved == 0.05


def test_warmup_can_be_a_fraction_of_the_steps():
    cfg = train_cfg(steps=200, warmup_steps=15, warmup_fraction=0.1)
    assert optim.warmup_steps(cfg) == 20
    factor = optim.lr_lambda(cfg)
    assert factor(0) == pytest.approx(1 / 20) and factor(19) == 1.0 and factor(20) == 1.0
    assert factor(110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 90 / 180)))
    assert optim.warmup_steps(train_cfg(steps=200, warmup_steps=15)) == 15


@pytest.mark.parametrize("name, per_element", [
    ("sgd", True), ("adamw", True), ("lion", True), ("lamb", False), ("lars", False), ("adamp", False),
    ("clion", False), ("adafactor", False)])
def test_per_tensor_optimizers_are_told_apart_from_element_wise_ones(name, per_element):
    """ZeRO flattens parameters: LAMB's trust ratio, LARS's, AdamP's projection and the cautious
    masks would be taken over a whole partition instead of one tensor."""
    assert optim.updates_per_element(name) is per_element


def test_a_per_tensor_optimizer_under_zero_is_refused_and_allowed_without_it():
    model = model_with("lora")
    with pytest.raises(UserError, match="use --zero-stage 0"):
        optim.check_optimizer(model, train_cfg(optimizer="lamb", zero_stage=2))
    optim.check_optimizer(model, train_cfg(optimizer="lamb", zero_stage=0))
    optim.check_optimizer(model, train_cfg(optimizer="adamw", zero_stage=3))


@pytest.mark.parametrize("override, message", [
    ("train.lr_scale=cubic", "must be one of"), ("train.optimizer=sgdd", "must be one of"),
    ("train.optimizer=adahessian", "must be one of"), ("train.base_batch=0", "must be positive"),
    ("train.warmup_fraction=1", "in [0, 1)"), ("train.layer_decay=0", "in (0, 1]"),
    ("train.layer_decay=1.5", "in (0, 1]")])
def test_bad_optimizer_settings_are_user_errors(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_config(overrides=[override])


def test_the_default_warmup_is_cut_to_a_short_run_and_a_note_says_so():
    """The default 15-step warm-up on a 6-step run: the schedule is the one the engine always ran
    (warm-up over all 6 steps), and now the start-of-training lines say so instead of 'warm-up 15'."""
    from engine.config import parse_args

    cfg = parse_args(["--steps", "6"]).train
    assert cfg.warmup_steps == 15 and optim.warmup_steps(cfg) == 6
    factor = optim.lr_lambda(cfg)
    assert [factor(s) for s in range(6)] == [(s + 1) / 6 for s in range(6)]
    assert optim.describe(cfg) == "optimizer sgd, lr 0.05, warm-up 6 steps"
    assert optim.warmup_note(cfg) == ("train.warmup_steps 15 is longer than the run (train.steps 6): the warm-up "
                                      "takes all 6 steps, so the learning rate peaks at the last one and does not decay")
    assert optim.warmup_note(parse_args(["--steps", "15"]).train) is None
    assert optim.warmup_note(parse_args(["--steps", "6", "train.warmup_fraction=0.5"]).train) is None


def test_the_train_loop_prints_the_warmup_note_once(tmp_path, capsys):
    from engine.distributed import init_distributed
    from engine.embedded import create_embedded_vit
    from engine.train import train

    init_distributed()
    torch.manual_seed(0)
    strategy = adapters.get_strategy("linear", AdapterConfig())
    model = strategy.apply(create_embedded_vit(pretrained=False, num_classes=0), 10)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    cfg = train_cfg(steps=2, eval_every=2, batch_size=4, zero_stage=0)
    train(model, strategy, batches, batches, cfg, torch.device("cpu"), tmp_path, lambda *a: None, progress=False)
    out = capsys.readouterr().out.splitlines()
    assert "optimizer sgd, lr 0.05, warm-up 2 steps" in out
    assert [line for line in out if line.startswith("note: ")] == [f"note: {optim.warmup_note(cfg)}"]


@pytest.mark.parametrize("args", [
    ["--steps", "6", "train.warmup_steps=50"],
    ["--steps", "6", "--config", "{yaml}"],           # the user's own YAML chose it
    ["--config", "{yaml}", "train.steps=6"],
])
def test_a_chosen_warmup_longer_than_the_run_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, args):
    import engine.run

    def reached(*a, **k):
        raise AssertionError("work started before the warm-up was checked")

    monkeypatch.setattr(engine.run, "start", reached)
    yaml_path = tmp_path / "recipe.yaml"
    yaml_path.write_text("train:\n  warmup_steps: 50\n")
    argv = [a.format(yaml=yaml_path) for a in args]
    assert engine.run.main(["--out", str(tmp_path / "runs"), *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: train.warmup_steps 50 is longer than the run (train.steps 6); lower it to at most 6, or give "
        "train.warmup_fraction"]
    assert not (tmp_path / "runs").exists()


def test_a_warmup_the_user_did_not_choose_this_time_is_not_refused(tmp_path):
    """A fraction overrides warmup_steps; a run's saved config.yaml lists every key (its warm-up
    was the default): --resume and engine.export read it as they always did."""
    from engine.config import RunConfig, parse_args, save_yaml

    cfg = parse_args(["--steps", "6", "train.warmup_steps=50", "train.warmup_fraction=0.5"])
    assert optim.warmup_steps(cfg.train) == 3
    saved = RunConfig()
    saved.train.steps = 6
    save_yaml(saved, tmp_path / "run" / "config.yaml")
    assert "warmup_steps: 15" in (tmp_path / "run" / "config.yaml").read_text()
    assert parse_args(["--resume", str(tmp_path / "run")]).train.warmup_steps == 15
    assert build_config(str(tmp_path / "run" / "config.yaml")).train.warmup_steps == 15
    assert parse_args(["--steps", "6", "train.warmup_steps=6"]).train.warmup_steps == 6  # the whole run: allowed
