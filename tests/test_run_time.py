"""results.json's `time_s` as the run's clock (engine.resume.RunClock) keeps it: phases that sum
to the wall time at every instant, carried over processes by a checkpoint's facts."""
import time

import pytest

from engine.resume import PHASES, RunClock


def test_the_phases_and_other_sum_to_the_wall_time_and_a_block_lent_to_another_phase_returns():
    clock = RunClock(began=time.perf_counter() - 2.0)  # two seconds of imports before the clock was made
    clock.enter("train")
    with clock.within("validation"):
        time.sleep(0.01)
    facts = clock.facts()
    assert list(facts["time_s"]) == [*PHASES, "other"]
    assert facts["time_s"]["startup"] >= 2.0 and facts["time_s"]["validation"] >= 0.01
    assert clock.phase == "train"
    assert sum(facts["time_s"].values()) == pytest.approx(facts["wall_s"], abs=0.01)


def test_a_checkpoints_phases_are_carried_and_what_they_do_not_split_is_other():
    clock = RunClock()
    clock.carry({"wall_s": 10.0, "processes": 1, "time_s": {"startup": 3.0, "train": 6.0, "other": 0.5}})
    times = clock.facts()["time_s"]
    assert times["train"] == 6.0 and times["startup"] >= 3.0
    assert times["other"] == pytest.approx(1.0, abs=0.01)  # 10 s carried, 9 s of them in phases
    clock.carry({"wall_s": 10.0, "processes": 1})  # a checkpoint from before time_s: all of it other
    assert clock.facts()["time_s"]["other"] == pytest.approx(10.0, abs=0.01)


def test_an_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="unknown phase"):
        RunClock().enter("lunch")
