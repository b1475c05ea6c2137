"""Config: defaults < YAML < flags < key=value, typed, validated, saved resolved."""
import pytest
import yaml

from engine.config import RunConfig, build_config, save_yaml
from engine.errors import UserError


def test_defaults_come_from_the_dataclasses():
    assert build_config() == RunConfig()


def test_precedence_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.3, "steps": 7, "eval_every": 5}, "strategy": "linear"}))
    cfg = build_config(str(path), {"lr": 0.2, "steps": None}, ["train.lr=0.1"])
    assert cfg.train.lr == 0.1          # key=value beats the flag
    assert cfg.train.steps == 7         # an unset flag leaves the YAML value
    assert cfg.train.eval_every == 5
    assert cfg.strategy == "linear"
    cfg = build_config(str(path), {"lr": 0.2})
    assert cfg.train.lr == 0.2          # the flag beats YAML


def test_overrides_are_coerced_to_the_declared_type():
    cfg = build_config(overrides=["adapter.active_blocks=3", "train.grad_clip=1.5", "dry_run=true",
                                  "eval.knn_k=5,10", "eval.knn_report_k=10", "adapter.lora_alpha=none"])
    assert cfg.adapter.active_blocks == 3 and cfg.train.grad_clip == 1.5 and cfg.dry_run is True
    assert cfg.eval.knn_k == [5, 10] and cfg.adapter.lora_alpha is None


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "unknown config key 'train.lrr'"),
    ("nosection.lr=1", "unknown config key"),
    ("train.steps=ten", "expects int"),
    ("train.steps=0", "must be positive"),
    ("train.precision=fp64", "must be one of"),
    ("data.loader=magic", "must be one of"),
    ("adapter.active_fraction=1.5", "active_fraction"),
    ("lr", "must look like key=value"),
])
def test_bad_keys_and_values_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        build_config(overrides=[override])


def test_unknown_yaml_key_is_a_user_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="train.learning_rate"):
        build_config(str(path))


def test_missing_yaml_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_config(str(tmp_path / "nope.yaml"))


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(overrides=["train.lr=0.01", "adapter.lora_targets=q,k,v", "eval.knn_k=10,20"])
    save_yaml(cfg, tmp_path / "config.yaml")
    assert build_config(str(tmp_path / "config.yaml")) == cfg


def test_report_k_is_added_to_the_k_list():
    cfg = build_config(overrides=["eval.knn_k=10", "eval.knn_report_k=20"])
    assert cfg.eval.knn_k == [10, 20]


def test_the_paper_recipe_file_loads():
    from pathlib import Path
    cfg = build_config(str(Path(__file__).parents[1] / "configs" / "paper_cifar100.yaml"))
    assert (cfg.train.steps, cfg.train.eval_every, cfg.train.batch_size, cfg.train.warmup_steps) == (10000, 500, 128, 500)
    assert cfg.model.name == "vit_base_patch16_224.dino" and cfg.data.target == "cifar100"


@pytest.mark.parametrize("item", ["data.crop_scale_min=0", "data.crop_scale_min=1.5", "data.hflip=-0.1",
                                  "data.hflip=2"])
def test_augmentation_ranges_are_checked(item):
    with pytest.raises(UserError, match=item.split("=")[0]):
        build_config(overrides=[item])


def test_choices_come_from_their_owners(monkeypatch):
    """A strategy registered with adapters (or a kernel backend) is a valid choice and shows in --help."""
    import adapters
    from adapters.base import Strategy
    from engine import config

    class Throwaway(Strategy):
        name = "throwaway"

        def trainable_names(self, model):
            return []

    monkeypatch.setitem(adapters.STRATEGIES, "throwaway", Throwaway)
    monkeypatch.setitem(config._CHOICES, "strategy", tuple(adapters.STRATEGIES))
    assert build_config(overrides=["strategy=throwaway"]).strategy == "throwaway"
    help_text = config.build_parser("p", "d").format_help()
    assert "throwaway" in help_text
    import kernels
    assert all(name in help_text for name in kernels.BACKENDS)


def test_every_flag_sets_a_key_and_has_help():
    from engine import config

    parser = config.build_parser("p", "d")
    actions = {a.dest: a for a in parser._actions}
    for dest, key in config.FLAG_KEYS.items():
        config.key_hint(key)  # a real config key
        assert actions[dest].help, dest
    assert set(config.FLAG_KEYS) == {a.dest for a in parser._actions} - {"help", "overrides", "config"}


def test_the_kernels_backend_is_a_train_setting_and_the_old_key_still_reads(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("adapter:\n  kernels: torch\n")
    assert build_config(str(path)).train.kernels == "torch"
    assert build_config(flags={"kernels": "reference"}).train.kernels == "reference"


def test_every_numeric_key_has_a_range_or_choices():
    """A number a user can set is checked: a range in _RANGES, choices, or the adapter section's own check."""
    from engine import config
    from engine.dotted import flatten

    numeric = [key for key in flatten(RunConfig().to_dict())
               if not key.startswith("adapter.") and config.key_hint(key) in (int, float, int | None, float | None)]
    assert numeric and [key for key in numeric if key not in config._RANGES and key not in config._CHOICES] == []


def test_help_shows_each_options_default():
    from engine import config

    help_text = " ".join(config.build_parser("p", "d").format_help().split())
    for flag, key, _ in config.FLAGS:
        if config.default(key) not in (None, False):
            assert f"default: {config.default(key)}; key {key}" in help_text, flag


def test_a_long_choice_list_is_not_spelled_out_in_the_error_line():
    """timm lists about 100 optimisers: the line names the nearest few and points at --help."""
    with pytest.raises(UserError) as error:
        build_config(flags={"optimizer": "lamd"})
    line = str(error.value)
    assert line.startswith("train.optimizer must be one of the ") and "names --help lists (nearest: " in line
    assert "lamb" in line and "adabelief" not in line and len(line) < 200


@pytest.mark.parametrize("text, where", [
    (b"train:\n  lr: 0.1\n  steps: ten: 10\n", "line 3, column 13: mapping values are not allowed here"),
    (b"eval:\n  knn_k: [10, 20\n", "line 3, column 1: expected ',' or ']', but got '<stream end>' "
                                   "(while parsing a flow sequence at line 2, column 10)"),
    (b"train:\n\tlr: 0.1\n", "line 2, column 1: found character '\\t' that cannot start any token"),
    (b"name: caf\xe9\n", "line 1, column 10: byte 0xe9 is not utf-8 (invalid continuation byte)"),
    (b"train:\n  lr: 0.1\x00\n", "line 2, column 10: character #x0000 (special characters are not allowed)"),
])
def test_invalid_yaml_names_the_line_and_column(tmp_path, capsys, text, where):
    from engine.run import main

    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(UserError) as refused:
        build_config(str(path))
    assert str(refused.value) == f"config file {path} is not valid YAML: {where}"
    assert main(["--config", str(path), "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: config file {path} is not valid YAML: {where}"]
