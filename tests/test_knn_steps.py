"""`eval.knn_steps`: steps, ranges and `log`, parsed for the forgetting curve; bad forms refused in one line."""
import pytest

from engine.config import build_config, parse_run_args
from engine.curve import curve_steps, log_steps, parse_steps
from engine.errors import UserError
from engine.presets import PAPER
from engine.sweep import build_grid


def test_a_range_lists_every_step_and_log_adds_the_default_steps():
    assert parse_steps(["0-10", "20", "50", "100"], 100) == [*range(11), 20, 50, 100]
    assert parse_steps(["0-10", "log"], 10_000) == [*range(11), 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000]
    assert parse_steps(["log"], 150) == log_steps(150)
    assert parse_steps([7, "3-5", "4", " 9 "], 10) == [3, 4, 5, 7, 9]  # YAML ints, overlaps, spaces
    assert parse_steps(["4-4"], 10) == [4]


def test_the_config_keeps_the_forms_and_the_curve_expands_them():
    cfg = build_config(flags={"knn_steps": "0-3,log", "steps": 20})
    assert cfg.eval.knn_steps == ["0-3", "log"]
    assert curve_steps(cfg.eval.knn_steps, cfg.train.steps) == [0, 1, 2, 3, 5, 10, 20]


@pytest.mark.parametrize("given, message", [
    ("5-2", "eval.knn_steps: range '5-2' runs backwards; write it as 2-5"),
    ("a", "eval.knn_steps: 'a' is not a step N, a range A-B"),
    ("1-", "'1-' is not a step"),
    ("1-2-3", "'1-2-3' is not a step"),
    ("0,,3", "'' is not a step"),
    ("0-1.5", "'0-1.5' is not a step"),
    ("logs", "'logs' is not a step"),
    ("0-200", "eval.knn_steps must lie in 0..train.steps (150), got 0-200"),
    ("-1", "must lie in 0..train.steps"),
])
def test_bad_forms_are_refused_in_one_line(given, message):
    with pytest.raises(UserError) as e:
        build_config(flags={"knn_steps": given})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_paper_preset_measures_every_step_of_the_first_ten_then_log_spaced():
    point = build_grid(PAPER.rows[:1], [0], PAPER.base_args, ("data.source=imagefolder:/imagenet",),
                       default_lrs=PAPER.lrs)[0]
    cfg = parse_run_args(point.args, "the paper preset")
    assert curve_steps(cfg.eval.knn_steps, cfg.train.steps) == [*range(11), *log_steps(10_000)[5:]]
    assert log_steps(10_000)[5:] == [20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000]
