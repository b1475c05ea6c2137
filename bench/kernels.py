"""Microbenchmarks of the fused LoRA linear (kernels.lora_linear) at ViT-B shapes.

    python -m bench.kernels            # all ViT-B layers, R = 8, fp32 + bf16 (a few minutes on 2 cores)
    python -m bench.kernels --quick    # qkv + proj, full mode only, fewer rounds (about a minute; prints only)
    python -m bench.kernels --threads 1 --clock cpu   # process CPU time: steady on a busy machine
    python -m bench.kernels --rank 128 --shapes qkv proj  # the Selective LoRA paper's rank (up to kernels.MAX_RANK)
    python -m bench.kernels --help

Providers (bench/lora_problems.py): `reference`, `peft-style` (a module computing as HF peft does,
with q/v zero-padded to the qkv width), `hf-peft` (HF peft's own LoRA Linear; on qkv it wraps the
whole layer, different work; built and timed in a worker process, bench/peers.py), `torch`,
`triton`, `triton-xa-buffer` (CUDA only), and the gated-skip baselines `linear` and `torch-g0`.
Modes: forward, backward (of a retained graph), full (both).

Timing runs on pytest-benchmark (this file is also its test module: `test_kernel` below), with
triton.testing.do_bench as the timer on CUDA. Each row has the time (min over rounds, the least
disturbed on a shared machine; the median is kept too), achieved GFLOP/s (FlopCounterMode's count
of the work) and GB/s (the bytes a fused implementation must move), and the fraction of the
roofline of this machine, whose GEMM peak and copy bandwidth are measured in the same run. Then a
ratio section: the torch path against HF peft and the peft-style module, and gate 0 against a plain
linear, with the providers taking turns round after round (a busy machine slows them all alike).
On CUDA it also prints measured vs the roofline prediction (bench/README.md). A full run writes
bench/results/kernels-<device>.{csv,json}; --quick only prints, unless --save or --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from kernels import MAX_RANK

from .device import device_name
from . import peers
from .lora_problems import (DTYPES, MODES, PEER_PROVIDERS, PROVIDERS, SHAPES, available_providers, bench_fn,
                            build_problem, hf_peft_layer, min_bytes, useful_flops, work_note, xa_buffer)
from .report import add_output_options, format_table, parse_args, save_or_skip
from .roofline import measure_peaks, roofline_prediction, roofline_seconds
from .timing import CLOCKS, best_time

CONFIG_ENV = "BENCH_KERNELS_CONFIG"
COLUMNS = ("section", "device", "shape", "M", "K", "N", "R", "dtype", "provider", "mode", "time_ms",
           "median_ms", "gflops", "gbps", "roofline_frac", "peak_gflops", "peak_gbps", "ratio", "ratio_median",
           "work", "note")
RATIO_PROVIDERS = ("hf-peft", "peft-style", "torch", "linear", "torch-g0")


# --------------------------------------------------------------------------------------------------
# pytest-benchmark: `run_cases` runs pytest on this module; the cases come from CONFIG_ENV.

def _config():
    return json.loads(os.environ.get(CONFIG_ENV, "{}"))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = [c for c in _config().get("cases", []) if c["provider"] not in PEER_PROVIDERS]
        metafunc.parametrize("case", cases, ids=["-".join(str(v) for v in c.values()) for c in cases])


def test_kernel(benchmark, case):
    cfg = _config()
    device = cfg["device"]
    p = build_problem(case["shape"], cfg["batch"], cfg["rank"], case["dtype"], device)
    with xa_buffer(case["provider"]):
        fn = bench_fn(p, case["provider"], case["mode"])
        benchmark.extra_info.update(case)
        if device == "cuda":
            from triton.testing import do_bench
            benchmark.extra_info["do_bench_ms"] = do_bench(fn, warmup=25, rep=100)
            benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=cfg["rounds"], warmup_rounds=2)
        else:
            benchmark.pedantic(fn, rounds=cfg["rounds"], warmup_rounds=1)
        for t in [p.x, *p.lora_a, *p.lora_b]:
            t.grad = None


def run_cases(cfg: dict) -> tuple[int, list[dict]]:
    """Time cfg["cases"] with pytest-benchmark in this process, the peer's in its worker
    (`peer_benchmarks`); (pytest's exit code, the benchmarks in the order of the cases)."""
    import pytest

    os.environ[CONFIG_ENV] = json.dumps(cfg)
    # called from a pytest-xdist worker (the suite), pytest-benchmark would see its PYTEST_XDIST_WORKER and
    # disable itself: this inner session is not one of xdist's
    xdist_worker = os.environ.pop("PYTEST_XDIST_WORKER", None)
    ours = [c for c in cfg["cases"] if c["provider"] not in PEER_PROVIDERS]
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "bench.json"
        # pytest.ini's addopts disable benchmarks and spread tests over xdist workers (which disables them too)
        code = pytest.main([__file__, "-q", "-o", "addopts=", "-p", "no:cacheprovider", "--benchmark-enable",
                            f"--benchmark-json={json_path}", "--benchmark-columns=min,median,rounds",
                            "--benchmark-sort=name", "--benchmark-disable-gc"]
                           + ([f"--benchmark-timer=time.{CLOCKS['cpu'].__name__}"] if cfg["clock"] == "cpu" else []))
        if xdist_worker is not None:
            os.environ["PYTEST_XDIST_WORKER"] = xdist_worker
        benchmarks = json.loads(json_path.read_text())["benchmarks"] if code == 0 else []
    if code == pytest.ExitCode.NO_TESTS_COLLECTED and not ours:  # only the peer's cases
        code = 0
    if code != 0:
        return int(code), []
    keys = list(cfg["cases"][0]) if cfg["cases"] else []
    return 0, sorted(benchmarks + peer_benchmarks(cfg),
                     key=lambda b: cfg["cases"].index({k: b["extra_info"][k] for k in keys}))


def peer_benchmarks(cfg: dict) -> list[dict]:
    """cfg["cases"] of the peer (hf-peft), timed in its worker as pytest-benchmark times the others
    here (one untimed call, then one call a round, by the run's clock: the worker's own CPU time
    with --clock cpu), in pytest-benchmark's form (extra_info: the case; stats: min, median)."""
    out = []
    for case in cfg["cases"]:
        if case["provider"] in PEER_PROVIDERS:
            p = build_problem(case["shape"], cfg["batch"], cfg["rank"], case["dtype"], cfg["device"])
            times = peers.shared().lora_times(hf_peft_layer(p), case["mode"], cfg["rounds"], CLOCKS[cfg["clock"]])
            out.append({"extra_info": dict(case), "stats": {"min": min(times), "median": statistics.median(times)}})
    return out


def kernel_rows(benchmarks: list[dict], cfg: dict, peaks: dict, device_label: str) -> list[dict]:
    rows = []
    for b in benchmarks:
        case = b["extra_info"]
        p = build_problem(case["shape"], cfg["batch"], cfg["rank"], case["dtype"], cfg["device"])
        t_min = case.get("do_bench_ms", b["stats"]["min"] * 1e3) / 1e3
        flops = useful_flops(p, case["provider"], case["mode"])
        nbytes = min_bytes(p, case["provider"], case["mode"])
        peak_gflops, peak_gbps = peaks[case["dtype"]]
        rows.append(dict(section="kernel", device=device_label, shape=case["shape"], M=p.m, K=p.k, N=p.n, R=p.r,
                         dtype=case["dtype"], provider=case["provider"], mode=case["mode"],
                         time_ms=round(t_min * 1e3, 4), median_ms=round(b["stats"]["median"] * 1e3, 4),
                         gflops=round(flops / t_min / 1e9, 1), gbps=round(nbytes / t_min / 1e9, 1),
                         roofline_frac=round(roofline_seconds(flops, nbytes, peak_gflops, peak_gbps) / t_min, 3),
                         peak_gflops=round(peak_gflops, 1), peak_gbps=round(peak_gbps, 1),
                         work=work_note(p, case["provider"]), note=_run_note(cfg, "do_bench_ms" in case)))
    return rows


def _run_note(cfg: dict, do_bench: bool = False) -> str:
    timer = "do_bench" if do_bench else f"{cfg['clock']} clock, min of rounds"
    return f"{timer}; {torch.get_num_threads()} threads; load average {cfg['load']:.1f}"


# --------------------------------------------------------------------------------------------------
# Ratios, the providers taking turns

def interleaved_ratios(device, batch, rank, dtypes, shapes, rounds, clock, providers=RATIO_PROVIDERS):
    """fwd + bwd of each provider, round after round in a rotating order (no fixed neighbour): per
    (shape, dtype), each provider's best round and the per-round times."""
    results = []
    for dtype_name in dtypes:
        for shape in shapes:
            p = build_problem(shape, batch, rank, dtype_name, device)
            print(f"ratios {shape} {dtype_name}: {rounds} rounds of {', '.join(providers)} ...", flush=True)
            one_round = {prov: round_timer(p, prov, device, clock) for prov in providers}
            times = {prov: [] for prov in providers}
            order = list(providers)
            for i in range(rounds):
                for prov in order[i % len(order):] + order[:i % len(order)]:
                    times[prov].append(one_round[prov]())
            results.append(dict(problem=p, dtype=dtype_name, times=times))
    return results


def round_timer(p, provider: str, device: str, clock):
    """After a warm-up call, a callable timing one round of fwd + bwd (`best_time` of one call: one
    untimed call, one timed) and returning its seconds; the peer's (hf-peft) in its worker, by its clock."""
    if provider in PEER_PROVIDERS:
        key = hf_peft_layer(p)
        peers.shared().lora_times(key, "full", 0, clock)  # the warm-up call
        return lambda: peers.shared().lora_times(key, "full", 1, clock)[0]
    fn = bench_fn(p, provider, "full")
    fn()  # warm-up
    return lambda: best_time(fn, device, 1, clock)


RATIOS = (("torch", "hf-peft"), ("torch", "peft-style"), ("torch-g0", "linear"))  # (measured, against)


def ratios(times: dict) -> dict:
    """(ours, other) -> (ratio of the best rounds, median of the per-round ratios): the speedup of
    the torch path over each peft, and the cost of gate 0 over a plain linear (1.0: free)."""
    out = {}
    for ours, other in RATIOS:
        if ours in times and other in times:
            slow, fast = (other, ours) if ours == "torch" else (ours, other)
            out[ours, other] = (min(times[slow]) / min(times[fast]),
                                statistics.median(a / b for a, b in zip(times[slow], times[fast])))
    return out


def ratio_rows(results, device_label, cfg):
    rows = []
    for res in results:
        p, times = res["problem"], res["times"]
        for (ours, other), (ratio, median) in ratios(times).items():
            rows.append(dict(section="ratio", device=device_label, shape=p.shape, M=p.m, K=p.k, N=p.n, R=p.r,
                             dtype=res["dtype"], provider=f"{ours}/{other}", mode="full",
                             time_ms=round(min(times[ours]) * 1e3, 4),
                             median_ms=round(statistics.median(times[ours]) * 1e3, 4),
                             ratio=round(ratio, 3), ratio_median=round(median, 3), work=work_note(p, other),
                             note=f"{other} {min(times[other]) * 1e3:.2f} ms; {len(times[ours])} rounds; "
                                  + _run_note(cfg)))
    return rows


def ratio_table(results, markdown=False):
    """One line per (shape, dtype): the torch path against each peft, and gate 0 against F.linear."""
    lines = []
    for res in results:
        p, times = res["problem"], res["times"]
        line = {"shape": p.shape, "dtype": res["dtype"], "torch path ms": min(times["torch"]) * 1e3}
        for (ours, other), (ratio, median) in ratios(times).items():
            if ours == "torch":
                line[f"{other} ms"] = min(times[other]) * 1e3
                line[f"speedup vs {other}"] = f"{ratio:.3f}x ({median:.3f}x)"
            else:
                line["gate 0 / linear"] = f"{ratio:.3f} ({median:.3f})"
        line["note"] = "; ".join(f"{prov}: {work_note(p, prov)}" for prov in times if work_note(p, prov))
        lines.append(line)
    columns = [c for c in ("shape", "dtype", "torch path ms", "hf-peft ms", "speedup vs hf-peft", "peft-style ms",
                           "speedup vs peft-style", "gate 0 / linear", "note") if any(c in line for line in lines)]
    return format_table(lines, columns, formats={c: ".2f" for c in columns if c.endswith(" ms")}, markdown=markdown)


def roofline_check(rows, cfg, peaks, dtypes, shapes, markdown=False):
    """On CUDA: measured fwd + bwd of triton and peft-style against the roofline prediction."""
    lines = []
    for d in dtypes:
        for s in shapes:
            p = build_problem(s, cfg["batch"], cfg["rank"], d, cfg["device"])
            pred_f, pred_e = roofline_prediction(p.m, p.k, p.n, p.r, [w for _, w in p.segments],
                                                 p.x.element_size(), *peaks[d])
            got = {r["provider"]: r["time_ms"] for r in rows
                   if r["section"] == "kernel" and r["shape"] == s and r["dtype"] == d and r["mode"] == "full"}
            if "triton" in got and "peft-style" in got:
                lines.append(dict(shape=s, dtype=d, fused_ms=got["triton"], fused_predicted_ms=pred_f * 1e3,
                                  eager_ms=got["peft-style"], eager_predicted_ms=pred_e * 1e3,
                                  speedup=got["peft-style"] / got["triton"], speedup_predicted=pred_e / pred_f))
    return format_table(lines, lines[0], formats={"speedup": ".2f", "speedup_predicted": ".2f"},
                        markdown=markdown) if lines else "(no triton and peft-style rows in full mode)"


# --------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="qkv + proj, full mode, fewer rounds (~1 min on a CPU); prints only unless --save/--out")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="ViT-B layers (default: all; quick: qkv proj)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: all that run on this device")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: all (quick: full)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, help="images per batch, M = batch x 197 (default: 8 on CPU, 64 on CUDA)")
    parser.add_argument("--rank", type=int, default=8, help=f"LoRA rank R, 1..{MAX_RANK} (default 8; 128 is the "
                                                           "Selective LoRA paper's)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default 10, quick 4)")
    parser.add_argument("--ratio-rounds", type=int, help="interleaved rounds for the ratio section (default 15, quick 7)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="cpu: time.process_time, steadier than wall time on a shared, oversubscribed "
                             "machine (use with --threads 1; CPU only)")
    add_output_options(parser, quick=True)
    args = parse_args(parser, argv)
    if not 1 <= args.rank <= MAX_RANK:
        parser.error(f"--rank must be in 1..{MAX_RANK} (kernels.MAX_RANK, the largest rank the engine takes), "
                     f"got {args.rank}")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock_name = "cpu" if args.clock == "cpu" and device == "cpu" else "wall"
    here = available_providers(device)
    providers = [p for p in args.providers or PROVIDERS if p in here]
    for missing in sorted(set(args.providers or ()) - set(here)):
        print(f"note: provider {missing} does not run here ({'no CUDA' if missing.startswith('triton') else 'peft is not installed'})")
    shapes = args.shapes or (["qkv", "proj"] if args.quick else list(SHAPES))
    modes = args.modes or (["full"] if args.quick else list(MODES))
    cfg = dict(device=device, clock=clock_name, load=os.getloadavg()[0],
               batch=args.batch or (64 if device == "cuda" else 8), rank=args.rank,
               rounds=args.rounds or (4 if args.quick else 10),
               cases=[dict(shape=s, dtype=d, provider=p, mode=m)
                      for d in args.dtypes for s in shapes for p in providers for m in modes])
    name = device_name()
    print(f"device {name}: {len(cfg['cases'])} cases, M = {cfg['batch']} x 197, R = {cfg['rank']}, "
          f"{torch.get_num_threads()} threads, {'CPU' if clock_name == 'cpu' else 'wall'} clock, "
          f"load average {cfg['load']:.1f}")

    clock = CLOCKS[clock_name]
    peaks = {d: measure_peaks(device, DTYPES[d], 3 if args.quick else 6, clock) for d in args.dtypes}
    for d, (gf, gb) in peaks.items():
        print(f"measured peaks {d}: GEMM {gf:.1f} GFLOP/s, copy {gb:.1f} GB/s")

    code, benchmarks = run_cases(cfg)
    if code != 0:
        print(f"pytest-benchmark run failed (exit code {code})", file=sys.stderr)
        return code
    rows = kernel_rows(benchmarks, cfg, peaks, name)
    print()
    print(format_table(rows, ("shape", "dtype", "provider", "mode", "time_ms", "gflops", "gbps", "roofline_frac",
                              "work"), formats={"time_ms": ".3f", "roofline_frac": ".3f"}, markdown=args.markdown))

    ratio_rounds = args.ratio_rounds or (7 if args.quick else 15)
    results = interleaved_ratios(device, cfg["batch"], cfg["rank"], args.dtypes, shapes, ratio_rounds, clock,
                                 [p for p in RATIO_PROVIDERS if p in here])
    rows += ratio_rows(results, name, cfg)
    print(f"\nfwd + bwd, providers taking turns, {ratio_rounds} rounds; ratio of the best rounds (median of "
          "per-round ratios); gate 0 / linear is its cost (1.000: free):")
    print(ratio_table(results, args.markdown))

    if device == "cuda":
        print("\nmeasured vs roofline prediction (fwd + bwd, this GPU's measured peaks):")
        print(roofline_check(rows, cfg, peaks, args.dtypes, shapes, args.markdown))

    save_or_skip(args, "kernels", rows, COLUMNS, tag="-cpu-clock" if clock_name == "cpu" else "",
                 meta={"load_average": cfg["load"], "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
