"""`python -m engine.interpolate RUN`: the weight-space interpolation curve of a finished run (WiSE-FT).

theta(alpha) = (1 - alpha) theta_0 + alpha theta_1, tensor by tensor, at alphas 0, 0.1, ..., 1
(`--alphas` changes them; values past 1 extrapolate). theta_1 is the run's fine-tuned model as the
run measured it (RUN/adapter restored and finalised); theta_0 is the same strategy applied to the
untouched backbone and finalised without its trained tensors, so for every strategy it computes what
the untouched backbone computes:

- full, top-k, linear: theta_0 is the untouched backbone's weights;
- LoRA and selective LoRA: both ends are merged (the dropped selective blocks on neither), so
  theta(alpha) = W + alpha * s * B A: alpha scales the low-rank delta;
- block expansion: the inserted blocks move from their identity initialisation (attn.proj and
  mlp.fc2 zero), the original blocks stay as they are on both ends.

The head (`head.*`) is the fine-tuned one at every alpha, except with `model.head_init=zeroshot`
(CLIP), where it moves from the zero-shot head as WiSE-FT's does. Each alpha gets the run's
measures: target top-1 (test split), source k-NN (eval.knn_report_k), accuracy under shift
(eval.shift) and zero-shot accuracy (eval.zeroshot) where the run has them. The untouched
backbone's source features are extracted once and serve every alpha whose backbone is theta_0's
(alpha 0; every alpha of linear probing). Alpha 0 gives the run's `source_knn_before` and alpha 1
its `target_top1`, `source_knn_after` and `shift_top1`, exactly.

Writes RUN/interpolation.csv (a row per alpha) and RUN/interpolation.png (target top-1 against
source k-NN, a point per alpha), each atomically, while holding the run folder (a run still going
is refused). `--out DIR` writes them into DIR instead (made where missing, held too), leaving RUN
as it was: a sweep's derived row (`presets.Row.interpolate`, WiSE-FT) keeps its own folder so. `key=value` may change the measurement (eval.*, data.loader, data.workers,
data.data_root), nothing that changes the model.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

import adapters

from . import data, run, shift
from .adapter_files import read_adapter_config
from .config import build_config
from .errors import UserError
from .evaluate import extract_features, top1_accuracy
from .folder_lock import FolderLock
from .io import atomic_write, atomic_write_text
from .knn import knn_accuracy
from .models import build_backbone, restore_model
from .precision import PRECISIONS

ALPHAS = tuple(i / 10 for i in range(11))
HEAD = "head."
CHANGEABLE = ("eval.", "data.loader", "data.workers", "data.data_root", "data.dali_resize")


def interpolate(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor], alpha: float,
                keep: tuple[str, ...] = (HEAD,)) -> dict[str, torch.Tensor]:
    """(1 - alpha) theta0 + alpha theta1 for every floating tensor; keys starting with a `keep` prefix,
    and integer tensors, are theta1's. Alpha 0 gives theta0's tensors and 1 theta1's exactly."""
    if theta0.keys() != theta1.keys():
        missing, extra = sorted(theta1.keys() - theta0.keys()), sorted(theta0.keys() - theta1.keys())
        raise ValueError(f"the two ends differ in their tensors: only at 1: {missing[:3]}, only at 0: {extra[:3]}")
    out = {}
    for name, end in theta1.items():
        start = theta0[name]
        if start.shape != end.shape:
            raise ValueError(f"{name}: shape {tuple(start.shape)} at 0, {tuple(end.shape)} at 1")
        if name.startswith(keep) or not end.is_floating_point():
            out[name] = end.clone()
        elif alpha == 0:
            out[name] = start.clone()
        elif alpha == 1:
            out[name] = end.clone()
        else:
            out[name] = torch.lerp(start, end, float(alpha)) if start.dtype == end.dtype else (1 - alpha) * start + alpha * end
    return out


def parse_alphas(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0], sorted, each once; UserError for anything else."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--alphas takes a comma list of numbers, e.g. 0,0.25,0.5,0.75,1; got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"--alphas takes a comma list of finite numbers, e.g. 0,0.5,1; got {text!r}")
    return values


def endpoints(cfg, run_dir: Path, num_classes: int, device) -> tuple[torch.nn.Module, dict, dict, tuple[str, ...]]:
    """(the fine-tuned model, finalised; theta_0 and theta_1 as state dicts; the prefixes kept at theta_1)."""
    adapter_dir = run_dir / "adapter"
    meta = read_adapter_config(adapter_dir)
    model1, strategy1 = restore_model(cfg, adapter_dir)
    model1 = strategy1.finalize(model1.to(device)).eval()
    torch.manual_seed(cfg.seed)  # the run's backbone again (a random init repeats)
    strategy0 = adapters.get_strategy(meta["strategy"], cfg.adapter)
    model0 = strategy0.apply(build_backbone(cfg.model), num_classes)
    try:
        strategy0.load_state(model0, meta["state"])  # block positions, gates: the structure of theta_1
    except adapters.AdapterError as e:
        raise UserError(f"cannot rebuild {adapter_dir}'s structure: {e}") from None
    model0 = strategy0.finalize(model0.to(device))
    theta0 = {k: v.detach() for k, v in model0.state_dict().items()}
    theta1 = {k: v.detach().clone() for k, v in model1.state_dict().items()}
    keep = (HEAD,)
    head0 = zeroshot_head(cfg, run_dir)
    if head0 is not None:  # WiSE-FT: the head moves from the zero-shot classifier too
        theta0.update({k: v.to(theta0[k]) for k, v in head0.items()})
        keep = ()
    return model1, theta0, theta1, keep


def zeroshot_head(cfg, run_dir: Path) -> dict | None:
    """The zero-shot head a `model.head_init=zeroshot` run started from (None for any other run)."""
    if getattr(cfg.model, "head_init", "new") != "zeroshot":
        return None
    from .zeroshot import initial_head  # CLIP only: open_clip is imported only here
    return initial_head(cfg, run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.interpolate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN", help="a finished run folder (results.json, config.yaml, adapter/)")
    parser.add_argument("--alphas", default=",".join(f"{a:g}" for a in ALPHAS),
                        help="comma list of alphas (default: 0,0.1,...,1)")
    parser.add_argument("--out", metavar="DIR", help="write interpolation.csv / .png into DIR (default: RUN)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"measurement keys only: {', '.join(CHANGEABLE)}")
    args = parser.parse_intermixed_args(argv)
    try:
        rows = interpolation_curve(Path(args.run_dir), parse_alphas(args.alphas), args.overrides,
                                   Path(args.out) if args.out else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    return 0


def _check_run_dir(run_dir: Path) -> None:
    for name in ("config.yaml", "results.json", "adapter"):
        if not (run_dir / name).exists():
            raise UserError(f"{run_dir} is not a finished run folder: it has no {name}"
                            + (" (the run has not finished)" if name == "results.json" else ""))


def interpolation_curve(run_dir: Path, alphas: list[float], overrides: list[str] = (),
                        out_dir: Path | None = None) -> list[dict]:
    """Measure theta(alpha) at each alpha; write interpolation.csv and .png into `out_dir` (default:
    RUN); return the rows."""
    _check_run_dir(run_dir)
    out_dir = run_dir if out_dir is None else out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key.startswith(CHANGEABLE):
            raise UserError(f"{item!r}: engine.interpolate takes key=value for {', '.join(CHANGEABLE)} only "
                            f"(the model is the run's)")
    cfg = build_config(str(run_dir / "config.yaml"), overrides=list(overrides))
    out_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock.take(run_dir, "run folder"), \
            (FolderLock.take(out_dir, "output folder") if out_dir.resolve() != run_dir.resolve() else nullcontext()):
        rows = _measure(run_dir, cfg, alphas)
        write_csv(out_dir / "interpolation.csv", rows)
        plot_curve(rows, out_dir / "interpolation.png", f"{cfg.strategy} on {cfg.model.name}: weight interpolation "
                   f"untouched (0) -> fine-tuned (1)")
    return rows


def _measure(run_dir: Path, cfg, alphas: list[float]) -> list[dict]:
    rt = run.start(cfg)
    run_data = run.read_data(cfg, rt)
    cfg = run_data.cfg
    torch.manual_seed(cfg.seed)
    untouched = build_backbone(cfg.model).to(rt.device)
    pre = data.Preprocess.from_model(untouched, crop_scale_min=cfg.data.crop_scale_min, hflip=cfg.data.hflip)
    loaders = run.make_loaders(run_data, pre, rt)
    amp = PRECISIONS[cfg.train.precision]
    model, theta0, theta1, keep = endpoints(cfg, run_dir, run_data.num_classes, rt.device)
    zeroshot = _zeroshot_scorer(cfg, run_data, pre, rt)
    k = cfg.eval.knn_report_k

    def source_features(net):
        bank = extract_features(net, loaders.knn_bank, rt.device, amp, desc="k-NN bank", progress=rt.main, sharded=True)
        query = extract_features(net, loaders.knn_query, rt.device, amp, desc="k-NN queries", progress=rt.main,
                                 sharded=True)
        return bank, query

    untouched_features = source_features(untouched)  # once: every alpha whose backbone is theta_0's uses them
    del untouched
    backbone_keys = [name for name in theta1 if not name.startswith(HEAD)]
    rows = []
    for alpha in alphas:
        state = interpolate(theta0, theta1, alpha, keep)
        model.load_state_dict(state)
        at_start = all(torch.equal(state[n], theta0[n]) for n in backbone_keys)
        (bank, bank_y), (query, query_y) = untouched_features if at_start else source_features(model)
        knn = knn_accuracy(bank, bank_y, query, query_y, cfg.eval.knn_k, cfg.eval.knn_temperature,  # the run's ks:
                           num_classes=run_data.source.num_classes)[k]                         # the same top-k
        row = {"alpha": alpha, "target_top1": top1_accuracy(model, loaders.test, rt.device, amp, desc=f"test a={alpha:g}",
                                                            progress=rt.main, sharded=True),
               "source_knn": knn}
        per_set = shift.shift_top1(model, loaders.shift, loaders.eval_loader, rt.device, model.num_classes, amp,
                                   progress=rt.main)
        if per_set:
            row["target_shift_top1"] = sum(per_set.values()) / len(per_set)
            row.update({f"shift_top1[{spec}]": v for spec, v in per_set.items()})
        if zeroshot is not None:
            per_set = zeroshot(model)
            row["zeroshot_mean"] = per_set["mean"]
            row.update({f"zeroshot[{name}]": v for name, v in per_set.items() if name != "mean"})
        rt.say(f"alpha {alpha:g}: target top-1 {row['target_top1']:.2f}%, source {k}-NN {knn:.2f}%"
               + (f", shift {row['target_shift_top1']:.2f}%" if "target_shift_top1" in row else ""))
        rows.append(row)
    return rows


def _zeroshot_scorer(cfg, run_data, pre, rt):
    """A function model -> zero-shot accuracies (per set and "mean"), or None when the run measures none."""
    if not getattr(cfg.eval, "zeroshot", None):
        return None
    from .zeroshot import scorer  # CLIP only: open_clip is imported only here
    return scorer(cfg, pre, rt)


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    atomic_write_text(path, buffer.getvalue())


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def row_at(folder: Path, alpha: float) -> dict | None:
    """FOLDER/interpolation.csv's row at `alpha` (None: no such file, or no row at that alpha yet)."""
    try:
        rows = read_csv(Path(folder) / "interpolation.csv")
    except (OSError, ValueError):
        return None
    return next((r for r in rows if math.isclose(r.get("alpha", math.nan), alpha, abs_tol=1e-9)), None)


def plot_curve(rows: list[dict], out: Path, title: str) -> Path:
    """Target top-1 against source k-NN, one point per alpha (labelled), joined in alpha order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    xs, ys = [r["source_knn"] for r in rows], [r["target_top1"] for r in rows]
    ax.plot(xs, ys, color="C0", marker="o", markersize=4, linewidth=1)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"{r['alpha']:g}", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("source k-NN accuracy % (stability)")
    ax.set_ylabel("target top-1 % (plasticity)")
    ax.set_title(title + "\nlabels: alpha", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()

    def save(tmp: str) -> None:
        fig.savefig(tmp, dpi=120, format="png")

    try:
        atomic_write(out, save)
    finally:
        plt.close(fig)
    return out


def format_rows(rows: list[dict]) -> str:
    columns = [c for c in ("alpha", "target_top1", "source_knn", "target_shift_top1", "zeroshot_mean")
               if any(c in r for r in rows)]
    lines = ["  ".join(f"{c:>17}" for c in columns)]
    lines += ["  ".join(f"{r[c]:>17.4g}" if c == "alpha" else f"{r[c]:>17.2f}" if c in r else f"{'-':>17}"
                        for c in columns) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
