"""Continual-learning measures of an accuracy matrix: pure functions, no model, no data.

`R[t][j]` is the accuracy (%) on task j after training stage t, for j <= t (tasks seen so far),
None for j > t (not seen yet); stages and tasks are counted from 0, and the last row T = len(R) - 1
is the model now. The definitions are the continual-learning literature's as Avalanche and mammoth
compute them (/work/shared/reference/anchors.md, "Continual learning metrics"):

- average accuracy after stage T: mean over j <= T of R[T][j] (Avalanche's StreamAccuracy over
  the experiences seen; mammoth's mean accuracy in the task-incremental setting).
- backward transfer (Lopez-Paz and Ranzato 2017, GEM; mammoth's `backward_transfer`): mean over
  j < T of R[T][j] - R[j][j]. Negative = forgetting; None with a single stage (no earlier task).
- forgetting of task j < T (Chaudhry et al. 2018, RWalk): max over t in j..T-1 of R[t][j] - R[T][j],
  the best accuracy the task ever had before now minus its accuracy now. mammoth's `forgetting`
  takes that max over every row, the last one included, so its per-task value is max(0, this);
  `mean_forgetting(R, clamp=True)` gives mammoth's figure.
- experience forgetting of task j < T (Avalanche's `ExperienceForgetting`): accuracy right after
  first training on j minus the last, R[j][j] - R[T][j].
"""
from __future__ import annotations

from typing import Sequence

Matrix = Sequence[Sequence[float | None]]


def check_matrix(R: Matrix) -> None:
    """Refuse what is not an accuracy matrix: square (one column per task, one row per stage),
    every R[t][j] with j <= t a number and every j > t None."""
    if not R:
        raise ValueError("an accuracy matrix needs at least one stage")
    n = len(R)
    for t, row in enumerate(R):
        if len(row) != n:
            raise ValueError(f"row {t} has {len(row)} entries; a matrix of {n} stages needs {n}")
        for j, value in enumerate(row):
            if (value is None) != (j > t):
                raise ValueError(f"R[{t}][{j}] is {value!r}: entries j <= t are accuracies, j > t None")


def average_accuracy(R: Matrix, t: int | None = None) -> float:
    """Mean accuracy over the tasks seen after stage `t` (default: the last): mean_{j<=t} R[t][j]."""
    check_matrix(R)
    t = len(R) - 1 if t is None else t
    return sum(R[t][: t + 1]) / (t + 1)


def backward_transfer(R: Matrix) -> float | None:
    """Lopez-Paz and Ranzato's BWT: mean over j < T of R[T][j] - R[j][j]; None for one stage."""
    check_matrix(R)
    T = len(R) - 1
    if T == 0:
        return None
    return sum(R[T][j] - R[j][j] for j in range(T)) / T


def forgetting(R: Matrix) -> list[float]:
    """Chaudhry et al.'s forgetting of each task j < T: max_{j<=t<T} R[t][j] - R[T][j] (may be negative:
    a task that gained since)."""
    check_matrix(R)
    T = len(R) - 1
    return [max(R[t][j] for t in range(j, T)) - R[T][j] for j in range(T)]


def mean_forgetting(R: Matrix, clamp: bool = False) -> float | None:
    """The mean of `forgetting` over the tasks j < T; `clamp`: each task's at least 0, as mammoth's
    `forgetting` computes it (its max runs over the last row too). None for one stage."""
    per_task = forgetting(R)
    if not per_task:
        return None
    return sum(max(0.0, f) if clamp else f for f in per_task) / len(per_task)


def experience_forgetting(R: Matrix) -> list[float]:
    """Avalanche's experience forgetting of each task j < T: R[j][j] - R[T][j]."""
    check_matrix(R)
    T = len(R) - 1
    return [R[j][j] - R[T][j] for j in range(T)]


def summary(R: Matrix) -> dict:
    """Every measure of the matrix as it stands (its last row the model now), for sequence.json."""
    return {"average_accuracy": average_accuracy(R), "backward_transfer": backward_transfer(R),
            "forgetting": forgetting(R), "mean_forgetting": mean_forgetting(R),
            "mean_forgetting_mammoth": mean_forgetting(R, clamp=True),
            "experience_forgetting": experience_forgetting(R)}
