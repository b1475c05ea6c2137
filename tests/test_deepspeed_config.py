"""A user's DeepSpeed JSON over ours: theirs wins (also for the batch geometry the loaders follow),
each contradicted key is reported in one line, bad files are refused in one line."""
import json

import pytest

from engine.config import TrainConfig
from engine.distributed import adopt_deepspeed_config, deepspeed_config
from engine.errors import UserError
from engine.run import main


def user_config(tmp_path, config) -> str:
    path = tmp_path / "ds.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


def test_their_batch_geometry_and_stage_win_and_each_contradiction_is_one_line(tmp_path):
    path = user_config(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                                  "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000000}})
    cfg, notes = adopt_deepspeed_config(TrainConfig(batch_size=32, deepspeed_config=path), world=2)
    assert (cfg.batch_size, cfg.grad_accum, cfg.zero_stage) == (16, 2, 1)  # 4 x 2 x 2 ranks
    assert notes == [f"DeepSpeed config {path} sets train_micro_batch_size_per_gpu = 4 over ours (16)",
                     f"DeepSpeed config {path} sets gradient_accumulation_steps = 2 over ours (1)",
                     f"DeepSpeed config {path} sets zero_optimization.stage = 1 over ours (2)"]
    merged = deepspeed_config(cfg, world=2)
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000000}
    assert (merged["train_batch_size"], merged["train_micro_batch_size_per_gpu"]) == (16, 4)


@pytest.mark.parametrize("config, message", [
    ("{not json", "is not valid JSON"),
    ([1, 2], "must hold a JSON object"),
    ({"train_batch_size": "auto"}, 'train_batch_size is "auto"'),
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 5}, "is not train_micro_batch_size_per_gpu 5"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage must be one of"),
])
def test_a_bad_deepspeed_config_is_one_line_and_exit_2(tmp_path, capsys, config, message):
    code = main(["--strategy", "linear", "--steps", "1", "--out", str(tmp_path), "--deepspeed-config",
                 user_config(tmp_path, config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert not list(tmp_path.glob("linear-*"))  # refused before a run folder exists


def test_a_missing_deepspeed_config_is_named():
    with pytest.raises(UserError, match="DeepSpeed config /nonexistent.json does not exist"):
        adopt_deepspeed_config(TrainConfig(deepspeed_config="/nonexistent.json"), world=1)


@pytest.mark.parametrize("stage, world, theirs, runs", [
    (2, 1, None, 0),                                          # one process: nothing to shard
    (1, 1, None, 0),
    (3, 1, None, 3),                                          # ZeRO-3's gathering stays
    (0, 1, None, 0),
    (2, 2, None, 2),                                          # two ranks shard
    (2, 1, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, 2),  # theirs, as written
    (2, 1, {"gradient_clipping": 1.0}, 0),                    # their JSON without a ZeRO section
])
def test_one_process_runs_zero_1_and_2_as_stage_0(tmp_path, stage, world, theirs, runs):
    from engine.distributed import zero_stage_run

    path = user_config(tmp_path, theirs) if theirs else None
    cfg, _ = adopt_deepspeed_config(TrainConfig(batch_size=8, zero_stage=stage, deepspeed_config=path), world)
    assert zero_stage_run(cfg, world) == runs
    assert deepspeed_config(cfg, world)["zero_optimization"]["stage"] == runs


@pytest.mark.parametrize("grad_clip, engine_clips_at", [(None, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_gradient_clipping_is_what_the_config_says(grad_clip, engine_clips_at):
    """train.grad_clip=none is no clipping: left out of DeepSpeed's config, DeepSpeed clips at 1.0."""
    import adapters
    from engine.distributed import init_distributed
    from engine.embedded import create_embedded_vit
    from engine.train import make_engine

    init_distributed()
    strategy = adapters.get_strategy("linear", adapters.AdapterConfig())
    model = strategy.apply(create_embedded_vit(pretrained=False, num_classes=0), 10)
    groups = [g for g in strategy.param_groups(model) if g]
    engine, *_ = make_engine(model, TrainConfig(batch_size=8, grad_clip=grad_clip), groups)
    assert engine.gradient_clipping() == engine_clips_at
    assert TrainConfig().grad_clip == 1.0  # the default, as every run had it
