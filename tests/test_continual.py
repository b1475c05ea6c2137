"""engine.continual: the accuracy matrix's measures against hand computation on written matrices."""
import pytest

from engine import continual

# Three stages; task 0 peaks after stage 1 (95) before it drops to 75, so Chaudhry's forgetting
# (from the peak) and Avalanche's (from right after training) differ on it.
R = [[90.0, None, None],
     [95.0, 80.0, None],
     [75.0, 60.0, 96.0]]


def test_average_accuracy_over_the_tasks_seen():
    assert continual.average_accuracy(R) == pytest.approx((75 + 60 + 96) / 3)
    assert continual.average_accuracy(R, t=1) == pytest.approx((95 + 80) / 2)
    assert continual.average_accuracy(R, t=0) == 90.0


def test_backward_transfer_is_lopez_paz_and_ranzatos():
    # mean over j < T of R[T][j] - R[j][j]: (75 - 90 + 60 - 80) / 2
    assert continual.backward_transfer(R) == pytest.approx(-17.5)
    assert continual.backward_transfer([[42.0]]) is None


def test_forgetting_from_the_best_earlier_accuracy_and_from_right_after_training():
    assert continual.forgetting(R) == pytest.approx([95 - 75, 80 - 60])                 # Chaudhry et al. / mammoth
    assert continual.experience_forgetting(R) == pytest.approx([90 - 75, 80 - 60])      # Avalanche
    assert continual.mean_forgetting(R) == pytest.approx(20.0)
    assert continual.mean_forgetting([[1.0]]) is None


def test_a_task_that_gained_has_negative_forgetting_and_mammoths_clamps_it_at_zero():
    gained = [[50.0, None], [60.0, 70.0]]
    assert continual.forgetting(gained) == [-10.0]
    assert continual.experience_forgetting(gained) == [-10.0]
    assert continual.mean_forgetting(gained) == -10.0
    assert continual.mean_forgetting(gained, clamp=True) == 0.0  # mammoth's max runs over the last row too
    assert continual.backward_transfer(gained) == 10.0


def test_summary_holds_every_measure():
    s = continual.summary(R)
    assert s["average_accuracy"] == pytest.approx(77.0)
    assert s["backward_transfer"] == pytest.approx(-17.5)
    assert s["forgetting"] == pytest.approx([20.0, 20.0])
    assert s["experience_forgetting"] == pytest.approx([15.0, 20.0])
    assert s["mean_forgetting"] == s["mean_forgetting_mammoth"] == pytest.approx(20.0)


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]], [[1.0, None], [2.0]], [[None]], [[1.0, 2.0], [3.0, 4.0]],
                                 [[1.0, None], [None, 2.0]]])
def test_what_is_not_an_accuracy_matrix_is_refused(bad):
    with pytest.raises(ValueError):
        continual.average_accuracy(bad)
