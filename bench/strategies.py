"""Every strategy's train step side by side with the peers and the bounds, and every strategy through the real run.

    python -m bench.strategies --quick --save        # the step bench: ViT-S/16 160 px, batch 8, 3 rounds, 1 thread
    python -m bench.strategies                       # the same at batch 16, 7 rounds; writes bench/results
    python -m bench.strategies --model vit_base_patch16_224 --batch 8 --precision bf16
    python -m bench.strategies --engine-runs --strategies lora,full -- --steps 100 train.lr=0.01

The step bench (bench/strategy_steps.py builds the providers) times one train step of each
provider, the providers taking turns round after round (A B C A B C: a busy machine slows them all
alike), on random images; median img/s over the rounds, spread = (max - min) / median. Ratios
are medians of the per-round ratios (min..max beside). Each row: trainable parameters, train and
finalised-inference GFLOPs per image (FlopCounterMode; GMACs = GFLOPs / 2, every counted op is a
matmul), achieved GFLOP/s and its fraction of the fp32 GEMM peak measured in the same run, time
against the frozen lower bound, peak memory of a step (RSS on the CPU, max allocated on CUDA) and
the activations autograd saves. HF peft's rows live in a worker process (bench/peers.py: peft's
transformers cannot be imported beside this project's `kernels`): built, counted, measured and timed
there, by the same code (bench/step_measures.py), their rounds taking turns with the others all the
same; their peak memory is the worker's. It writes bench/results/strategies-<device>.{csv,json,png}
on a full run or with --save.

`--engine-runs` runs `engine.run` once per strategy (its own process, same seed and options) and
tabulates the runs' results.json: accuracy, forgetting and cost through the whole protocol
(bench/results/strategy-runs-<device>.{csv,json}).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from adapters import STRATEGIES

from .device import device_name
from . import peers
from .report import add_output_options, format_table, parse_args, save_or_skip

TABLE_COLUMNS = ("strategy", "trainable_params", "target_top1", "source_knn_before", "source_knn_after",
                 "forgetting", "mean", "train_img_per_s", "infer_img_per_s", "peak_mem_mb",
                 "train_gflops_per_img", "infer_gflops_per_img", "wall_s")


def engine_runs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`engine.run` per strategy, in processes of their own; a table of their results.json."""
    strategies = args.strategies.split(",")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    extra = [a for a in args.run_args if a != "--"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for strategy in strategies:
        name = f"{strategy}-{stamp}"
        cmd = [sys.executable, "-m", "engine.run", "--strategy", strategy, "--out", args.runs, "--name", name, *extra]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"{strategy}: run failed", file=sys.stderr)
            continue
        rows.append({"device": device_name(), **json.loads((Path(args.runs) / name / "results.json").read_text())})
    if not rows:
        return 1
    print()
    print(format_table(rows, TABLE_COLUMNS, formats={c: ".2f" for c in TABLE_COLUMNS[2:]}, markdown=args.markdown))
    save_or_skip(args, "strategy-runs", rows)
    return 0



# -- the step bench ------------------------------------------------------------------------------------

STEP_COLUMNS = ("label", "kind", "note", "trainable_params", "train_img_per_s", "train_spread", "train_gflops_per_img",
                "train_gmacs_per_img", "achieved_gflops", "frac_fp32_peak", "vs_lower_bound", "infer_img_per_s",
                "infer_vs_timm", "infer_gflops_per_img", "infer_gmacs_per_img", "peak_mem_mb", "saved_activations_mb")
RATIO_COLUMNS = ("ratio", "value", "range", "goal", "met", "what")


def only_rows(text: str | None, labels: tuple[str, ...]) -> list[str]:
    """`--only`'s comma list as row labels (all of `labels` when None). A label may hold commas
    itself (lora_r8_fc1,fc2): at each place the longest label that the next items spell is taken.
    ValueError naming the first item that starts no label."""
    if text is None:
        return list(labels)
    items, rows, i = text.split(","), [], 0
    while i < len(items):
        ends = [j for j in range(len(items), i, -1) if ",".join(items[i:j]) in labels]
        if not ends:
            raise ValueError(f"unknown row {items[i]!r}; choose from {', '.join(labels)}")
        rows.append(",".join(items[i:ends[0]]))
        i = ends[0]
    return rows


def build_providers(args, device: str, amp, worker) -> list:
    """Every provider of `args.only` (labels), in that order, the order they take turns. HF peft's
    are built in the peer worker `worker` (bench/peers.py), which they train under autocast `amp` in."""
    from . import step_measures as sm
    from . import strategy_steps as st

    x, y = sm.make_batch(args.batch, args.img_size, args.num_classes, device)

    def base():
        return sm.base_model(args.model, args.img_size, args.num_classes, device)

    makers = {label: (lambda label=label, spec=spec: st.strategy_provider(label, *spec, base(), x, y, "torch"))
              for label, spec in st.STRATEGY_ROWS.items()}
    for label, targets in st.OUR_LORA_TARGETS.items():
        makers[label] = lambda label=label, targets=targets: st.strategy_provider(
            label, "lora", {"lora_rank": st.PEER_RANK, "lora_targets": targets}, targets, base(), x, y, "torch")
    for label, regex in st.PEFT_TARGETS.items():
        makers[label] = lambda label=label, regex=regex: st.peft_provider(
            label, regex, worker, args.model, args.img_size, args.num_classes, args.batch, device, amp)

    def plain():
        model = base()
        p = st.Provider("timm_full_plain", "peer", model, st.optimiser_step(model, x, y),
                        note="timm model, plain torch loop, same optimiser")
        p.extra["finalize"] = lambda m: m
        return p
    makers["timm_full_plain"] = plain
    makers["engine_full"] = lambda: st.engine_full_provider(base(), x, y, args.batch)
    makers[st.BOUND] = lambda: st.bound_provider(base(), x, y)
    makers[st.CACHED] = lambda: st.cached_provider(base(), x, y)
    assert tuple(makers) == st.ROW_LABELS, "strategy_steps.ROW_LABELS names every row built here"
    providers = []
    for label in args.only:
        print(f"building {label} ...", flush=True)
        providers.append(st.finish(makers[label](), args.img_size, args.batch))
    return providers


def run_rounds(rounds_of: dict, rounds: int) -> dict:
    """label -> list of seconds per round, the labels taking turns every round; `rounds_of[label]()`
    runs one round and returns its seconds (a peer's is timed inside its worker)."""
    times = {label: [] for label in rounds_of}
    for r in range(rounds):
        for label, one_round in rounds_of.items():
            times[label].append(one_round())
        print(f"round {r + 1}/{rounds} done", flush=True)
    return times


def warm_up(providers, args, device: str, amp) -> tuple[dict, dict, dict]:
    """Each provider's warm-up step, measured for peak memory (its optimiser state is new) and the
    activations autograd saves (in p.extra["saved_mb"]), and one finalised forward; then label ->
    peak memory, and label -> one round of `args.steps` train steps / finalised forwards (`run_rounds`)."""
    import torch

    from engine.precision import autocast
    from . import step_measures as sm

    x, _ = sm.make_batch(args.batch, args.img_size, args.num_classes, device)

    def under_amp(fn):
        def run():
            with autocast(torch.device(device), amp):
                fn()
        return run

    def forward(model):
        @torch.no_grad()
        def run():
            with autocast(torch.device(device), amp):
                model.eval()(x)
        return run

    def rounds_here(fn, warm: bool = False):
        if warm:
            fn()
        return lambda: sm.timed(fn, args.steps, device)

    def rounds_there(p, what):
        return lambda: p.worker.call("peft_timed", label=p.label, what=what, steps=args.steps)

    memory, train, infer = {}, {}, {}
    for p in providers:
        if p.worker is not None:
            measured = p.worker.call("peft_warmup", label=p.label)
            memory[p.label], p.extra["saved_mb"] = measured["peak_mem_mb"], measured["saved_activations_mb"]
            train[p.label], infer[p.label] = rounds_there(p, "train"), rounds_there(p, "infer")
            continue
        step = under_amp(p.step)
        with sm.saved_activations(p.model) as saved:
            memory[p.label] = sm.step_memory_mb(step, device)
        p.extra["saved_mb"] = saved["mb"]
        train[p.label] = rounds_here(step)
        if p.infer_model is not None:
            infer[p.label] = rounds_here(forward(p.infer_model), warm=True)
    lora = next((p for p in providers if p.label == "lora_r8"), None)
    if lora is not None:
        infer["lora_r8_unmerged"] = rounds_here(forward(lora.model), warm=True)
    return memory, train, infer


def per_round_ratio(times: dict, a: str, b: str) -> tuple[float, float, float] | None:
    """Median, min and max over the rounds of time(a) / time(b); None if either is missing."""
    if a not in times or b not in times:
        return None
    ratios = [ta / tb for ta, tb in zip(times[a], times[b])]
    return statistics.median(ratios), min(ratios), max(ratios)


def step_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from . import step_measures as sm
    from . import strategy_steps as st
    from .roofline import measure_peaks

    try:
        args.only = only_rows(args.only, st.ROW_LABELS)
    except ValueError as e:
        parser.error(str(e))
    args.batch = args.batch or (8 if args.quick else 16)
    args.img_size = args.img_size or (160 if args.quick else 224)
    rounds = args.rounds or (3 if args.quick else 7)
    args.threads = args.threads or (1 if args.quick else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = torch.bfloat16 if args.precision == "bf16" else None
    started = time.perf_counter()
    peaks = {"fp32": measure_peaks(device, torch.float32, 3)[0]}
    if device == "cuda" or not args.quick or args.precision == "bf16":
        peaks["bf16"] = measure_peaks(device, torch.bfloat16, 1 if device == "cpu" else 3)[0]
    print("GEMM peak here: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
          + ("" if "bf16" in peaks else " (bf16 not measured: --quick in fp32 on a CPU)"), flush=True)
    worker = peers.shared()  # this process's peer worker: it starts with the first peft row, if any is asked for
    providers = build_providers(args, device, amp, worker)
    memory, train, infer = warm_up(providers, args, device, amp)
    print(f"warm-up done ({time.perf_counter() - started:.0f} s); {rounds} rounds of {len(train)} train steps",
          flush=True)
    train_times = run_rounds(train, rounds)
    print(f"{rounds} rounds of {len(infer)} finalised forwards", flush=True)
    infer_times = run_rounds(infer, rounds)
    if any(p.worker for p in providers):
        worker.call("drop", keys=[p.label for p in providers if p.worker])

    images = args.batch * args.steps
    rows = []
    for p in providers:
        t = statistics.median(train_times[p.label])
        img_s = images / t
        achieved = p.train_flops * img_s / 1e9
        bound = per_round_ratio(train_times, p.label, st.BOUND)
        row = {"label": p.label, "kind": p.kind, "note": p.note, "trainable_params": p.trainable_params,
               "train_img_per_s": img_s,
               "train_spread": (max(train_times[p.label]) - min(train_times[p.label])) / t,
               "train_gflops_per_img": p.train_flops / 1e9, "train_gmacs_per_img": p.train_flops / 2e9,
               "achieved_gflops": achieved, "frac_fp32_peak": achieved / peaks["fp32"],
               "vs_lower_bound": bound[0] if bound else None, "peak_mem_mb": memory[p.label],
               "saved_activations_mb": p.extra.get("saved_mb")}
        rows.append(row)
    unmerged = None
    for label in infer:
        row = next((r for r in rows if r["label"] == label), None)
        if row is None:  # the un-merged LoRA's forward: a row of its own
            lora = next(p for p in providers if p.label == "lora_r8")
            unmerged = row = {"label": label, "kind": "inference", "note": "LoRA r 8 q,v, not merged",
                              "infer_gflops_per_img": sm.flops_per_image(lora.model, args.img_size) / 1e9}
            rows.append(row)
        row["infer_img_per_s"] = images / statistics.median(infer_times[label])
        vs = per_round_ratio(infer_times, label, "timm_full_plain")
        row["infer_vs_timm"] = vs[0] if vs else None
        if row.get("infer_gflops_per_img") is None:
            row["infer_gflops_per_img"] = next(p for p in providers if p.label == label).infer_flops / 1e9
        row["infer_gmacs_per_img"] = row["infer_gflops_per_img"] / 2
    ratios = ratio_rows(rows, train_times, infer_times, providers, args.precision, peaks)
    print()
    print(format_table(rows, STEP_COLUMNS, formats={"train_spread": ".0%", "frac_fp32_peak": ".1%"},
                       markdown=args.markdown))
    print()
    print(format_table(ratios, RATIO_COLUMNS, markdown=args.markdown))
    print(f"\n{args.model} {args.img_size} px, batch {args.batch}, {args.precision}, {rounds} rounds x {args.steps} "
          f"step(s); {device_name()}; fp32 GEMM peak {peaks['fp32']:.1f} GFLOP/s; "
          f"{time.perf_counter() - started:.0f} s")
    meta = {"model": args.model, "img_size": args.img_size, "batch": args.batch, "precision": args.precision,
            "rounds": rounds, "steps": args.steps, "peaks_gflops": peaks}
    paths = save_or_skip(args, "strategies", rows + [{"label": f"ratio: {r['ratio']}", "kind": "ratio", **r}
                                                     for r in ratios], meta=meta)
    if paths:
        picture(rows, paths[0].with_suffix(".png"), f"{args.model} {args.img_size} px, batch {args.batch}, "
                f"{args.precision}, {device_name()}")
    return 0


def ratio_rows(rows: list[dict], train_times: dict, infer_times: dict, providers, precision: str,
               peaks: dict) -> list[dict]:
    """The issue's ratios, each with its goal: per-round medians of time ratios (speed-ups as a / b).
    Full fine-tuning's fraction of peak is against the GEMM peak of the run's precision where measured."""
    from . import strategy_steps as st

    by = {r["label"]: r for r in rows}
    out = []

    def add(name, value, rng, goal, met, what):
        if value is not None:
            out.append({"ratio": name, "value": value, "range": rng, "goal": goal, "met": met, "what": what})

    def speedup(ours, other):  # other's time / ours: > 1 when ours is faster
        r = per_round_ratio(train_times, other, ours)
        return (r[0], f"{r[1]:.3f}..{r[2]:.3f}") if r else (None, "")

    for ours, theirs, what in st.PEER_PAIRS:
        value, rng = speedup(ours, theirs)
        if ours == "engine_full":
            add(f"{ours} / {theirs} speed", value, rng, ">= 0.95", value is not None and value >= 0.95, what)
        elif what == "identical work":
            add(f"{ours} vs {theirs}", value, rng, ">= 1.15x", value is not None and value >= 1.15, what)
        else:
            add(f"{ours} vs {theirs}", value, rng, "", "", what)
    for label in ("lora_r8", "lora_r8_fc1,fc2", "lora_r8_proj", "lora_r8_q,k,v", "lora_r4", "lora_r16",
                  "selective_lora_10"):
        r = per_round_ratio(train_times, label, st.BOUND)
        if r:
            add(f"{label} / lower bound time", r[0], f"{r[1]:.3f}..{r[2]:.3f}", "<= 1.05",
                r[0] <= 1.05, "time of the step over the frozen forward + backward to the input")
    sel = [by.get(f"selective_lora_{f}") for f in (10, 50, 100)]
    if all(sel):
        t = [1 / r["train_img_per_s"] for r in sel]
        add("selective_lora 50% / 10% time", t[1] / t[0], "", "linear in active blocks", "",
            "gates fixed; 100% / 10%: " + f"{t[2] / t[0]:.3f}")
    if "full" in by:
        name = precision if precision in peaks else "fp32"
        frac = by["full"]["achieved_gflops"] / peaks[name]
        add(f"full: fraction of {name} GEMM peak", frac, "", ">= 0.70", frac >= 0.70,
            f"achieved train GFLOP/s over the measured {name} GEMM peak")
    for r in rows:
        if r.get("infer_vs_timm") is not None and r["label"] != "timm_full_plain":
            add(f"{r['label']} inference / timm time", r["infer_vs_timm"], "", "<= 1.03",
                r["infer_vs_timm"] <= 1.03, "finalised forward against plain timm's")
    base = by.get("timm_full_plain")
    flops = [by[f"selective_lora_{f}"] for f in (10, 50, 100) if f"selective_lora_{f}" in by]
    if base and flops:
        equal = all(r["infer_gflops_per_img"] == base["infer_gflops_per_img"] for r in flops)
        add("selective_lora finalised inference GFLOPs / base", flops[-1]["infer_gflops_per_img"]
            / base["infer_gflops_per_img"], "", "== 1 exactly", equal, "FlopCounterMode counts, every fraction")
    if base and "lora_r8_unmerged" in by:
        extra = by["lora_r8_unmerged"]["infer_gflops_per_img"] / base["infer_gflops_per_img"] - 1
        add("un-merged LoRA r8 extra inference FLOPs", extra, "", "", "",
            f"time / timm's: {by['lora_r8_unmerged'].get('infer_vs_timm') or 0:.3f}")
    value, rng = speedup(st.CACHED, "linear")
    add("linear cached features per-epoch speed-up", value, rng, ">= 20x", value is not None and value >= 20,
        "head step over cached features vs linear probing recomputing the frozen backbone")
    return out


def picture(rows: list[dict], path: Path, title: str) -> None:
    """Train img/s per row (peers and bounds marked) and finalised inference GFLOPs per image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r.get("train_img_per_s")]
    colours = {"strategy": "tab:blue", "peer": "tab:orange", "engine": "tab:red", "bound": "tab:grey",
               "cached": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.32 * len(trained) + 1.5),
                                      gridspec_kw={"width_ratios": [3, 2]})
    labels = [r["label"] for r in trained]
    left.barh(labels, [r["train_img_per_s"] for r in trained], color=[colours[r["kind"]] for r in trained])
    left.set_xscale("log")
    left.set_xlabel("train img/s (log)")
    left.invert_yaxis()
    left.legend(handles=[matplotlib.patches.Patch(color=c, label=k) for k, c in colours.items()], fontsize=8)
    inferred = [r for r in rows if r.get("infer_gflops_per_img") is not None]
    right.barh([r["label"] for r in inferred], [r["infer_gflops_per_img"] for r in inferred],
               color=[colours.get(r["kind"], "tab:purple") for r in inferred])
    right.set_xlabel("inference GFLOPs per image (finalised)")
    right.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.strategies", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224", help="timm ViT (random weights)")
    p.add_argument("--img-size", type=int, help="image side (default 224; --quick 160)")
    p.add_argument("--batch", type=int, help="images per step (default 16; --quick 8)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    p.add_argument("--rounds", type=int, help="timed rounds, providers taking turns (default 7; --quick 3)")
    p.add_argument("--steps", type=int, default=1, help="train steps per provider per round")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: torch's; --quick 1, steadier on a shared machine)")
    p.add_argument("--only", help="comma list of row labels, e.g. lora_r8_fc1,fc2,peft_r8_fc1,fc2 (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="160 px, batch 8, 3 rounds, 1 thread, no bf16 GEMM peak on a CPU unless --precision bf16; "
                        "prints only")
    p.add_argument("--engine-runs", action="store_true", help="run engine.run per strategy instead (see above)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="--engine-runs: comma list of strategies")
    p.add_argument("--runs", default="runs/bench-strategies", help="--engine-runs: folder for the runs")
    add_output_options(p, quick=True)
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="--engine-runs, after --: options passed to engine.run")
    args = parse_args(p, argv)
    if args.engine_runs:
        return engine_runs(args, p)
    return step_bench(args, p)


if __name__ == "__main__":
    sys.exit(main())
