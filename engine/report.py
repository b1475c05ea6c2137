"""The run's report: a table on screen and results.json / results.csv in the run folder.

`RESULT_KEYS` is a stable contract (DESIGN.md, "Run artefacts"): tools and tests read these files.
Accuracies are percentages; `forgetting` = source_knn_before - source_knn_after and
`mean` = (target_top1 + source_knn_after) / 2, as in the paper. The measures are rounded to 4
decimals; the run's facts (`RUN_FACTS`: lr, ...) are kept as given, and the package versions
(`VERSION_KEYS`, `<package>_version`) are added here.
`infer_img_per_s` is null when the run did not measure it (`eval.throughput_iters=0`).
`wall_s` is the time of all the run's processes together, from each one's start (the interpreter
and the imports included), `processes` of them (1 for a run never stopped; a resumed run adds each
earlier process up to its last full checkpoint). `time_s` splits it by phase (`engine.resume.PHASES`,
and `other`), summed over the processes the same way; printed as one line under the table.
"""
from __future__ import annotations

import csv
import io
import json
import platform
import sys
from pathlib import Path

from .io import atomic_write_json, atomic_write_text

MEASURES = ("trainable_params", "total_params", "target_top1", "source_knn_before", "source_knn_after",
            "forgetting", "mean", "train_img_per_s", "infer_img_per_s", "peak_mem_mb", "train_gflops_per_img",
            "infer_gflops_per_img", "wall_s", "processes")
# What makes two runs comparable without their config.yaml: the run's facts and the versions of the
# packages it used (None for one it did not import, e.g. DALI under --loader torch).
RUN_FACTS = ("target", "source", "seed", "steps", "lr", "batch_size", "precision", "loader", "optimizer",
             "lr_resolved")
_VERSIONED = {"python": None, "torch": "torch", "torchvision": "torchvision", "timm": "timm",
              "deepspeed": "deepspeed", "dali": "nvidia.dali", "numpy": "numpy", "pillow": "PIL"}
VERSION_KEYS = tuple(f"{name}_version" for name in _VERSIONED)
RESULT_KEYS = ("strategy", "model", *MEASURES, *RUN_FACTS, *VERSION_KEYS)
# Beside selective LoRA's blocks: accuracy under shift (engine.shift: per set, keyed by its spec, and their mean)
# and CLIP's zero-shot accuracy before and after fine-tuning (per data set and their "mean"; forgetting = the
# means' difference), present when the run measured them.
OPTIONAL_KEYS = ("time_s", "active_blocks", "total_blocks", "shift_top1", "target_shift_top1", "zeroshot_before",
                 "zeroshot_after", "zeroshot_forgetting")

_LABELS = {
    "trainable_params": "trainable params", "total_params": "total params",
    "target_top1": "target top-1 (test) %", "source_knn_before": "source k-NN before %",
    "source_knn_after": "source k-NN after %", "forgetting": "forgetting (points)", "mean": "mean %",
    "train_img_per_s": "train img/s", "infer_img_per_s": "infer img/s", "peak_mem_mb": "peak memory MB",
    "train_gflops_per_img": "train GFLOPs/img", "infer_gflops_per_img": "infer GFLOPs/img",
    "wall_s": "wall time s", "processes": "processes (wall time of)", "lr_resolved": "learning rate (resolved)",
    "active_blocks": "active LoRA blocks", "total_blocks": "LoRA blocks",
    "shift_top1": "shift top-1 %", "target_shift_top1": "shift top-1, mean of sets %",
    "zeroshot_before": "zero-shot before %", "zeroshot_after": "zero-shot after %",
    "zeroshot_forgetting": "zero-shot forgetting (points)",
}


def package_versions() -> dict[str, str | None]:
    """`VERSION_KEYS` -> the version of each package as this process imported it."""
    return {f"{name}_version": platform.python_version() if module is None
            else getattr(sys.modules.get(module), "__version__", None) for name, module in _VERSIONED.items()}


def build_results(values: dict) -> dict:
    """Order and round the results; derive `forgetting` and `mean`; add the package versions;
    refuse missing or unknown keys."""
    values = {**package_versions(), **values}
    values["forgetting"] = values["source_knn_before"] - values["source_knn_after"]
    values["mean"] = (values["target_top1"] + values["source_knn_after"]) / 2
    missing = [k for k in RESULT_KEYS if k not in values]
    unknown = [k for k in values if k not in RESULT_KEYS and k not in OPTIONAL_KEYS]
    if missing or unknown:
        raise KeyError(f"results: missing {missing}, unknown {unknown}")
    keys = list(RESULT_KEYS) + [k for k in OPTIONAL_KEYS if k in values]
    return {k: (round(values[k], 4) if isinstance(values[k], float) and k in MEASURES else values[k]) for k in keys}


def write_results(run_dir: Path, results: dict) -> None:
    """results.csv, then results.json: the file that marks the run finished (resume, sweeps) comes last."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(results))
    writer.writeheader()
    writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in results.items()})  # per-set: JSON
    atomic_write_text(run_dir / "results.csv", buffer.getvalue())
    atomic_write_json(run_dir / "results.json", results)


def format_table(results: dict, knn: dict | None = None) -> str:
    """A two-column table of the results, plus the k-NN accuracy at every k when given."""
    rows = []
    for k, v in results.items():
        if (k in MEASURES or k in OPTIONAL_KEYS) and k != "time_s":  # a per-set dict: a row per set
            rows += [(f"{_LABELS.get(k, k)} {name}", _fmt(x)) for name, x in v.items()] if isinstance(v, dict) \
                else [(_LABELS.get(k, k), _fmt(v))]
    if knn:
        for k in sorted(knn["before"]):
            rows.append((f"source {k}-NN before / after %", f"{knn['before'][k]:.2f} / {knn['after'][k]:.2f}"))
    width = max(len(label) for label, _ in rows)
    title = (f"{results['strategy']} on {results['model']}: target {results['target']}, source {results['source']}, "
             f"loader {results['loader']}")
    lines = [title, "-" * max(len(title), width + 14)]
    lines += [f"{label:<{width}}  {value:>12}" for label, value in rows]
    if "time_s" in results:
        lines.append(format_times(results["time_s"], results["wall_s"]))
    return "\n".join(lines)


def format_times(time_s: dict, wall_s: float) -> str:
    """One line: where the wall time went, phase by phase (those that took any)."""
    spent = [f"{phase.replace('_', ' ')} {seconds:.1f}" for phase, seconds in time_s.items() if seconds >= 0.05]
    return f"time s: {', '.join(spent)} (wall {wall_s:.1f})"


def _fmt(value) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4f}"
    return str(value)
