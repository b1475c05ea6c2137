"""The forgetting curve: source k-NN accuracy measured during training, at chosen steps.

The paper's abstract says a DINO ViT-B/16 loses over 70% of its ImageNet k-NN accuracy within 10
fine-tuning steps; the before/after pair in results.json cannot show when forgetting happens, this
curve does. At each listed step (`eval.knn_steps`, default log-spaced: 0, 1, 2, 5, 10, 20, 50, ...
and the last step; `0-10,log` adds every step of the first ten) the train loop hands the live
model to `ForgettingCurve.measure`, which extracts a capped subset of the source
(`eval.knn_curve_limit` bank images and as many queries) with the current weights and returns its
weighted k-NN accuracy. Nothing is kept between points, so memory
is (bank + queries) x feature width whatever the run's length; the curve's time is counted apart
from the training time (`seconds`). Step 0 is the untouched backbone: where its features on the curve's
subsets are already known (`untouched`, from engine.source_features) they are scored, not extracted.
With CLIP's eval.zeroshot, each point also scores the live image tower zero-shot (`measure_zeroshot`,
metrics.csv's `zeroshot`): zero-shot retention over the steps, as the source k-NN is forgetting.
"""
from __future__ import annotations

import csv
import re
import time
from pathlib import Path
from typing import Sequence

import torch

from .distributed import gathered
from .evaluate import extract_features
from .knn import knn_accuracy


def log_steps(last: int) -> list[int]:
    """0, 1, 2, 5, 10, 20, 50, 100, ... below `last`, then `last` itself."""
    steps, decade = [0], 1
    while decade < last:
        steps += [m * decade for m in (1, 2, 5) if m * decade < last]
        decade *= 10
    return steps + [last]


_STEP = re.compile(r"-?\d+")
_RANGE = re.compile(r"(\d+)-(\d+)")
STEPS_FORMS = "a step N, a range A-B (every step from A to B) or log (the default log-spaced steps)"


def parse_steps(items: Sequence[int | str], last: int) -> list[int]:
    """`eval.knn_steps`' items as steps, sorted, once each: `20` a step, `0-10` every step from 0 to 10,
    `log` the default `log_steps(last)` (so `0-10,log` is every step of the first ten, then
    log-spaced). ValueError, naming the item, for any other form."""
    steps: set[int] = set()
    for item in items:
        text = str(item).strip()
        if _STEP.fullmatch(text):
            steps.add(int(text))
        elif _RANGE.fullmatch(text):
            start, stop = map(int, _RANGE.fullmatch(text).groups())
            if start > stop:
                raise ValueError(f"range {text!r} runs backwards; write it as {stop}-{start}")
            steps.update(range(start, stop + 1))
        elif text == "log":
            steps.update(log_steps(last))
        else:
            raise ValueError(f"{text!r} is not {STEPS_FORMS}, e.g. 0-10,20,50,log")
    return sorted(steps)


def curve_steps(knn_steps: Sequence[int | str] | None, last: int) -> list[int]:
    """The steps the curve is measured at: `knn_steps` parsed (`parse_steps`), or `log_steps(last)` for None."""
    return log_steps(last) if knn_steps is None else parse_steps(knn_steps, last)


class ForgettingCurve:
    """Source k-NN accuracy (the report k) of the live model at `steps`, on fixed bank and query loaders."""

    def __init__(self, steps: Sequence[int], bank_loader, query_loader, *, ks: Sequence[int], report_k: int,
                 temperature: float, num_classes: int, device: torch.device, autocast_dtype=None,
                 zero_stage: int = 0) -> None:
        self.steps = list(steps)
        self.bank_loader, self.query_loader = bank_loader, query_loader
        self.ks, self.report_k, self.temperature = list(ks), report_k, temperature
        self.num_classes, self.device, self.autocast_dtype = num_classes, device, autocast_dtype
        self.zero_stage = zero_stage
        self.seconds = 0.0
        self._due = set(self.steps)
        # Step 0's features, when known before training (engine.source_features: the untouched backbone's
        # on these subsets, shared by the runs of a sweep): (bank, bank labels, queries, query labels).
        self.untouched: tuple[torch.Tensor, ...] | None = None
        # CLIP's zero-shot scorer on capped test sets (engine.zeroshot.ForRun.curve_score), or None
        self.zeroshot = None
        self._asked: int | None = None

    def due(self, step: int) -> bool:
        """Whether the curve is measured at `step`; the train loop asks before each `measure`."""
        self._asked = step
        return step in self._due

    def measure(self, model) -> float:
        """k-NN accuracy (%) of `model`'s current features; every rank calls it (ZeRO-3 gathers are collective).
        At step 0 with `untouched` features given, those are scored instead of extracting them again."""
        start = time.perf_counter()
        if self._asked == 0 and self.untouched is not None:
            bank, bank_y, query, query_y = self.untouched
        else:
            with gathered(model, self.zero_stage):  # features() reads the root's own parameters (cls_token, ...)
                bank, bank_y = extract_features(model, self.bank_loader, self.device, self.autocast_dtype,
                                                desc="curve bank", progress=False)
                query, query_y = extract_features(model, self.query_loader, self.device, self.autocast_dtype,
                                                  desc="curve queries", progress=False)
        accuracy = knn_accuracy(bank, bank_y, query, query_y, self.ks, self.temperature,
                                num_classes=self.num_classes)[self.report_k]
        self.seconds += time.perf_counter() - start
        return accuracy

    def measure_zeroshot(self, model) -> float | None:
        """The mean zero-shot top-1 (%) of `model` over eval.zeroshot's capped sets; None without them."""
        if self.zeroshot is None:
            return None
        start = time.perf_counter()
        with gathered(model, self.zero_stage):
            mean = self.zeroshot(model)["mean"]
        self.seconds += time.perf_counter() - start
        return mean

    def describe(self, bank_size: int, query_size: int) -> str:
        shown = ", ".join(map(str, self.steps[:9])) + (", ..." if len(self.steps) > 9 else "")
        return (f"forgetting curve: source {self.report_k}-NN at steps {shown} (last {self.steps[-1]}), on "
                f"{bank_size} bank / {query_size} query images (eval.knn_curve_limit)"
                + ("; and CLIP's mean zero-shot top-1 on eval.zeroshot's sets, as many images each at most"
                   if self.zeroshot is not None else ""))


def read_curve(metrics_csv: str | Path, column: str = "source_knn") -> list[tuple[int, float]]:
    """(step, value) of the rows of a run's metrics.csv that carry the curve: its source k-NN %, or with
    column="zeroshot" CLIP's mean zero-shot top-1 % (empty for a run that measured none)."""
    with open(metrics_csv, newline="") as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r.get(column)]
