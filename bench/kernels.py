"""Microbenchmarks of the fused LoRA linear (kernels.lora_linear) at ViT shapes.

    python -m bench.kernels            # all ViT-B layers, R = 8, fp32 + bf16 (a few minutes on 2 cores)
    python -m bench.kernels --quick    # qkv + proj, full mode only, fewer rounds (about a minute)
    python -m bench.kernels --threads 1 --clock cpu   # process CPU time: steady on a busy machine
    python -m bench.kernels --help

Providers: `reference` (the plain autograd composition), `peft` (a LoRA nn.Module written the way HF
peft's LoRA Linear computes: base(x) + B(A(x)) * s, the q/v update zero-padded to the qkv width as
litgpt does), `torch` (the fast path), `triton` and `triton-xa-buffer` (x A^T precomputed into an
M x R buffer instead of inside the GEMM loop; CUDA only), and two baselines for the gated-block
skip: `linear` (plain F.linear) and `torch-g0` (the op with every gate 0). Modes: forward,
backward (of a retained graph), full (forward + backward).

Timing runs on pytest-benchmark (this file is also its test module: `test_kernel` below), with
triton.testing.do_bench as the timer on CUDA. Each row has the time (min over rounds, the least
disturbed on a shared machine; the median is kept too), achieved GFLOP/s and GB/s counted from the
useful work (the same counts for every provider: recomputation is not credited), and the fraction of
the roofline of this machine, whose GEMM peak and copy bandwidth are measured in the same run.
Then a ratio section: the headline CPU ratios measured with the providers taking turns round after
round (so a busy machine slows them all alike), the median of the per-round ratios. On CUDA, it
also prints measured vs the roofline prediction (see bench/README.md). Results go to
bench/results/kernels-<device>.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from engine.metrics import sync

from .device import device_name

# ViT-B/16 layers: (K, N, segments as (start, width)). qkv carries LoRA on q and v only.
SHAPES = {
    "qkv": (768, 2304, ((0, 768), (1536, 768))),
    "proj": (768, 768, ((0, 768),)),
    "fc1": (768, 3072, ((0, 3072),)),
    "fc2": (3072, 768, ((0, 768),)),
}
PROVIDERS = ("reference", "peft", "torch", "triton", "triton-xa-buffer", "linear", "torch-g0")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_ENV = "BENCH_KERNELS_CONFIG"
COLUMNS = ("section", "device", "shape", "M", "K", "N", "R", "dtype", "provider", "mode", "time_ms",
           "median_ms", "gflops", "gbps", "roofline_frac", "peak_gflops", "peak_gbps", "note")
# The per-launch floor of the GPU roofline prediction. (The README's H100 prediction used this
# project's H100 figures: an 8192^3 bf16 matmul at ~798 TFLOP/s, a device-to-device copy at ~3.0 TB/s;
# a run on a GPU predicts from the peaks it measures itself.)
LAUNCH_US = 3.0


class PeftStyleLoRA(nn.Module):
    """A frozen Linear with LoRA segments, computed as HF peft's LoRA Linear does (out of place)."""

    def __init__(self, weight, bias, lora_a, lora_b, starts, scale):
        super().__init__()
        self.base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                              device=weight.device, dtype=weight.dtype)
        self.base.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.base.bias = nn.Parameter(bias, requires_grad=False)
        self.lora_A = nn.ModuleList(nn.Linear(a.shape[1], a.shape[0], bias=False, device=a.device, dtype=a.dtype)
                                    for a in lora_a)
        self.lora_B = nn.ModuleList(nn.Linear(b.shape[1], b.shape[0], bias=False, device=b.device, dtype=b.dtype)
                                    for b in lora_b)
        for lin, a in zip(self.lora_A, lora_a):
            lin.weight = nn.Parameter(a)
        for lin, b in zip(self.lora_B, lora_b):
            lin.weight = nn.Parameter(b)
        self.starts, self.scaling, self.dropout = list(starts), scale, nn.Identity()

    def forward(self, x):
        result = self.base(x)
        n_out = result.shape[-1]
        for lora_a, lora_b, start in zip(self.lora_A, self.lora_B, self.starts):
            delta = lora_b(lora_a(self.dropout(x))) * self.scaling
            if delta.shape[-1] != n_out:  # q / v inside the fused qkv: zero-pad to the full width
                delta = F.pad(delta, (start, n_out - start - delta.shape[-1]))
            result = result + delta
        return result


@dataclass
class Problem:
    shape: str
    m: int
    k: int
    n: int
    r: int
    dtype: torch.dtype
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: list
    lora_b: list
    starts: list
    dy: torch.Tensor
    scale: float = 2.0


@lru_cache(maxsize=8)
def build(shape, batch, rank, dtype_name, device):
    k, n, segs = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    m = batch * 197
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)

    return Problem(shape, m, k, n, rank, dtype, rand(m, k).requires_grad_(), rand(n, k, std=k ** -0.5),
                   rand(n), [rand(rank, k, std=k ** -0.5).requires_grad_() for _ in segs],
                   [rand(w, rank, std=0.1).requires_grad_() for _, w in segs], [s for s, _ in segs],
                   rand(m, n))


@contextlib.contextmanager
def _xa_buffer(provider):
    """Run `triton-xa-buffer` with the x A^T precompute instead of the in-loop product."""
    if provider != "triton-xa-buffer":
        yield
        return
    from kernels import _triton_lora
    old = dict(_triton_lora.FUSE_XA)
    _triton_lora.FUSE_XA.update({key: False for key in old})
    try:
        yield
    finally:
        _triton_lora.FUSE_XA.update(old)


def forward_fn(p: Problem, provider):
    """A closure computing y for one provider."""
    if provider == "peft":
        module = PeftStyleLoRA(p.weight, p.bias, p.lora_a, p.lora_b, p.starts, p.scale)
        return lambda: module(p.x)
    if provider == "linear":
        return lambda: F.linear(p.x, p.weight, p.bias)
    backend = {"torch-g0": "torch", "triton-xa-buffer": "triton"}.get(provider, provider)
    gates = [0.0] * len(p.starts) if provider == "torch-g0" else None
    return lambda: kernels.lora_linear(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.starts, p.scale,
                                       gates=gates, backend=backend)


def bench_fn(p: Problem, provider, mode):
    """The callable to time: forward, backward of a retained graph, or both."""
    fwd = forward_fn(p, provider)
    if mode == "forward":
        return fwd
    if mode == "full":
        return lambda: fwd().backward(p.dy)
    y = fwd()
    return lambda: y.backward(p.dy, retain_graph=True)


def _segments(p: Problem):
    return [b.shape[0] for b in p.lora_b]


def useful_flops(p: Problem, provider, mode):
    """FLOPs of the work itself, the same for every provider computing the same thing."""
    m, k, n, r = p.m, p.k, p.n, p.r
    lora = provider not in ("linear", "torch-g0")
    fwd = 2 * m * k * n + (sum(2 * m * k * r + 2 * m * r * w for w in _segments(p)) if lora else 0)
    bwd = 2 * m * n * k + (sum(4 * m * w * r + 4 * m * r * k for w in _segments(p)) if lora else 0)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def min_bytes(p: Problem, provider, mode):
    """Bytes a perfectly fused implementation must move (each operand read once, results written once)."""
    e = p.x.element_size()
    m, k, n, r = p.m, p.k, p.n, p.r
    lora = provider not in ("linear", "torch-g0")
    ab = sum(r * k + w * r for w in _segments(p)) if lora else 0
    fwd = e * (m * k + n * k + n + m * n + ab)
    bwd = e * (m * n + n * k + 2 * m * k + 2 * ab)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


_CLOCK = time.perf_counter


def _best_time(fn, device, reps):
    fn()
    sync(torch.device(device))
    best = float("inf")
    for _ in range(reps):
        t0 = _CLOCK()
        fn()
        sync(torch.device(device))
        best = min(best, _CLOCK() - t0)
    return best


def measure_peaks(device, dtype_name, quick):
    """This machine's own GEMM peak (GFLOP/s) for the dtype and its copy bandwidth (GB/s)."""
    dtype = DTYPES[dtype_name]
    gflops = 0.0
    # a big square product and the largest ViT-B GEMM at batch 8 (the BLAS may do better on either)
    for m, k, n in ([(8192,) * 3] if device == "cuda" else [(2048,) * 3, (1576, 768, 3072)]):
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        t = _best_time(lambda: a @ b, device, 3 if quick else 6)
        gflops = max(gflops, 2 * m * k * n / t / 1e9)
    src = torch.empty(64 * 2 ** 20 if device == "cpu" else 512 * 2 ** 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), device, 3 if quick else 6)
    return gflops, 2 * src.numel() / t / 1e9


# --------------------------------------------------------------------------------------------------
# pytest-benchmark: `main` runs pytest on this module; the cases come from CONFIG_ENV.

def _config():
    return json.loads(os.environ.get(CONFIG_ENV, "{}"))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _config().get("cases", [])
        metafunc.parametrize("case", cases, ids=["-".join(str(v) for v in c.values()) for c in cases])


def test_kernel(benchmark, case):
    cfg = _config()
    device = cfg["device"]
    p = build(case["shape"], cfg["batch"], cfg["rank"], case["dtype"], device)
    with _xa_buffer(case["provider"]):
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


# --------------------------------------------------------------------------------------------------

def interleaved_ratios(device, batch, rank, dtypes, shapes, rounds):
    """torch fast path vs peft-style module and gate-0 vs plain linear, fwd + bwd, taking turns."""
    rows = []
    for dtype_name in dtypes:
        for shape in shapes:
            p = build(shape, batch, rank, dtype_name, device)
            fns = {prov: bench_fn(p, prov, "full") for prov in ("peft", "torch", "linear", "torch-g0")}
            times = {prov: [] for prov in fns}
            for fn in fns.values():
                fn()  # warm-up
            order = list(fns)
            for i in range(rounds):
                for prov in order[i % len(order):] + order[:i % len(order)]:  # rotate: no fixed neighbour
                    times[prov].append(_best_time(fns[prov], device, 1))
            best = {prov: min(ts) for prov, ts in times.items()}
            rows.append(dict(shape=shape, dtype=dtype_name, M=p.m, K=p.k, N=p.n, R=rank,
                             torch_ms=best["torch"] * 1e3, peft_ms=best["peft"] * 1e3,
                             linear_ms=best["linear"] * 1e3, g0_ms=best["torch-g0"] * 1e3,
                             speedup=best["peft"] / best["torch"],
                             speedup_median=statistics.median(a / b for a, b in zip(times["peft"], times["torch"])),
                             gate0_over_linear=best["torch-g0"] / best["linear"],
                             gate0_median=statistics.median(a / b for a, b in zip(times["torch-g0"], times["linear"]))))
    return rows


def roofline_prediction(m, k, n, r, widths, elt, peak_gflops, peak_gbps, launch_us):
    """Predicted fwd + bwd time (s) of the fused op and of eager base + LoRA (the peft-style module):
    each kernel costs max(FLOPs / peak, bytes / bandwidth, launch floor). Returns (fused, eager)."""
    def t(flops, nbytes):
        return max(flops / (peak_gflops * 1e9), nbytes * elt / (peak_gbps * 1e9), launch_us * 1e-6)

    rt = r * len(widths)
    fused = [
        t(2 * m * k * n + sum(2 * m * k * r + 2 * m * r * w for w in widths),  # forward: one kernel
          m * k + n * k + n + m * n + sum(r * k + w * r for w in widths)),
        t(2 * m * n * k + sum(2 * m * w * r + 2 * m * r * k for w in widths),  # dX = dY W + s (dY B) A
          m * n + n * k + m * k + 2 * m * rt + sum(r * k + w * r for w in widths)),
        t(2 * m * rt * k, m * rt + m * k + rt * k),  # dA = s dS^T x
        t(2 * m * k * rt, m * k + m * rt + rt * k),  # S = x A^T again
    ] + [t(2 * m * w * r, m * w + m * r + w * r) for w in widths]  # dB_i = s dY_i^T S_i
    fused += [t(0, n * rt)] * (2 if len(widths) > 1 else 0)  # stacking A and B (fwd and bwd)
    eager = [t(2 * m * k * n, m * k + n * k + m * n), t(2 * m * n * k, m * n + n * k + m * k)]  # base fwd, dX
    for w in widths:
        eager += [t(2 * m * k * r, m * k + m * r), t(2 * m * r * w, m * r + m * w),  # A(x), B(.)
                  t(m * w, 2 * m * w)]  # * s
        if w != n:
            eager += [t(0, m * w + m * n)]  # zero-pad to the qkv width
        eager += [t(m * n, 3 * m * n)]  # result + delta
        eager += [t(m * w, 2 * m * w), t(2 * m * w * r, m * w + m * r + w * r),  # grad * s, dB
                  t(2 * m * w * r, m * w + m * r), t(2 * m * r * k, m * r + m * k + r * k),  # dh, dA
                  t(2 * m * r * k, m * r + m * k), t(m * k, 3 * m * k)]  # dx_lora, dx += dx_lora
    return sum(fused), sum(eager)


def _rows_from_json(path, device, peaks, cfg):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        case = b["extra_info"]
        p = build(case["shape"], cfg["batch"], cfg["rank"], case["dtype"], cfg["device"])
        t_min = b["extra_info"].get("do_bench_ms", b["stats"]["min"] * 1e3) / 1e3
        flops = useful_flops(p, case["provider"], case["mode"])
        nbytes = min_bytes(p, case["provider"], case["mode"])
        peak_gflops, peak_gbps = peaks[case["dtype"]]
        roof = max(flops / (peak_gflops * 1e9), nbytes / (peak_gbps * 1e9))
        rows.append(dict(section="kernel", device=device, shape=case["shape"], M=p.m, K=p.k, N=p.n, R=p.r,
                         dtype=case["dtype"], provider=case["provider"], mode=case["mode"],
                         time_ms=round(t_min * 1e3, 4), median_ms=round(b["stats"]["median"] * 1e3, 4),
                         gflops=round(flops / t_min / 1e9, 1), gbps=round(nbytes / t_min / 1e9, 1),
                         roofline_frac=round(roof / t_min, 3), peak_gflops=round(peak_gflops, 1),
                         peak_gbps=round(peak_gbps, 1),
                         note=("do_bench" if "do_bench_ms" in b["extra_info"] else cfg["clock"] + " clock, min of rounds")
                         + f"; {torch.get_num_threads()} threads; load average {cfg['load']:.1f}"))
    return rows


def _print_table(rows, columns):
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="qkv + proj, full mode, fewer rounds (~1 min on a CPU)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="ViT-B layers (default: all; quick: qkv proj)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, help="default: all that run on this device")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: all (quick: full)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, help="images per batch, M = batch x 197 (default: 8 on CPU, 64 on CUDA)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank R (default 8)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default 10, quick 4)")
    parser.add_argument("--ratio-rounds", type=int, help="interleaved rounds for the ratio section (default 15, quick 7)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: time.process_time, steadier than wall time on a shared, oversubscribed "
                             "machine (use with --threads 1; CPU only)")
    parser.add_argument("--out", type=Path, help="CSV path (default bench/results/kernels-<device>.csv)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _CLOCK
    use_cpu_clock = args.clock == "cpu" and not torch.cuda.is_available()
    _CLOCK = time.process_time if use_cpu_clock else time.perf_counter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.shapes or (["qkv", "proj"] if args.quick else list(SHAPES))
    providers = [p for p in args.providers or PROVIDERS if device == "cuda" or not p.startswith("triton")]
    modes = args.modes or (["full"] if args.quick else list(MODES))
    cfg = dict(device=device, clock="cpu" if use_cpu_clock else "wall", load=os.getloadavg()[0],
               batch=args.batch or (64 if device == "cuda" else 8), rank=args.rank,
               rounds=args.rounds or (4 if args.quick else 10),
               cases=[dict(shape=s, dtype=d, provider=p, mode=m)
                      for d in args.dtypes for s in shapes for p in providers for m in modes])
    name = device_name()
    out = args.out or Path(__file__).parent / "results" / f"kernels-{name}{'-cpu-clock' if use_cpu_clock else ''}.csv"
    print(f"device {name}: {len(cfg['cases'])} cases, M = {cfg['batch']} x 197, R = {cfg['rank']}, "
          f"{torch.get_num_threads()} threads, {'CPU' if use_cpu_clock else 'wall'} clock, "
          f"load average {cfg['load']:.1f}")

    peaks = {d: measure_peaks(device, d, args.quick) for d in args.dtypes}
    for d, (gf, gb) in peaks.items():
        print(f"measured peaks {d}: GEMM {gf:.1f} GFLOP/s, copy {gb:.1f} GB/s")

    import pytest
    os.environ[CONFIG_ENV] = json.dumps(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "bench.json"
        code = pytest.main([__file__, "-q", "-p", "no:cacheprovider", "--benchmark-enable",  # pytest.ini disables it
                            f"--benchmark-json={json_path}",
                            "--benchmark-columns=min,median,rounds", "--benchmark-sort=name",
                            "--benchmark-disable-gc"]
                           + (["--benchmark-timer=time.process_time"] if use_cpu_clock else []))
        if code != 0:
            print(f"pytest-benchmark run failed (exit code {code})", file=sys.stderr)
            return int(code)
        rows = _rows_from_json(json_path, name, peaks, cfg)

    print()
    _print_table(rows, ("shape", "dtype", "provider", "mode", "time_ms", "gflops", "gbps", "roofline_frac"))

    ratio_shapes = [s for s in ("qkv", "proj") if s in shapes]
    ratios = interleaved_ratios(device, cfg["batch"], cfg["rank"], args.dtypes, ratio_shapes,
                                args.ratio_rounds or (7 if args.quick else 15))
    print("\nfwd + bwd, providers taking turns; ratio of the best rounds (median of per-round ratios):")
    for r in ratios:
        print(f"  {r['shape']:5s} {r['dtype']}: torch path {r['torch_ms']:.2f} ms vs peft-style {r['peft_ms']:.2f} ms"
              f" -> {r['speedup']:.3f}x ({r['speedup_median']:.3f}x);  gate 0 {r['g0_ms']:.2f} ms vs plain linear "
              f"{r['linear_ms']:.2f} ms -> {r['gate0_over_linear']:.3f} ({r['gate0_median']:.3f})")
        rows.append(dict(section="ratio", device=name, shape=r["shape"], M=r["M"], K=r["K"], N=r["N"], R=r["R"],
                         dtype=r["dtype"], provider="torch/peft", mode="full", time_ms=round(r["torch_ms"], 4),
                         note=f"speedup {r['speedup']:.3f}x over peft-style ({r['peft_ms']:.2f} ms); "
                              f"median of rounds {r['speedup_median']:.3f}x; load average {cfg['load']:.1f}"))
        rows.append(dict(section="ratio", device=name, shape=r["shape"], M=r["M"], K=r["K"], N=r["N"], R=r["R"],
                         dtype=r["dtype"], provider="torch-g0/linear", mode="full", time_ms=round(r["g0_ms"], 4),
                         note=f"gate-0 / plain linear {r['gate0_over_linear']:.3f} ({r['linear_ms']:.2f} ms); "
                              f"median of rounds {r['gate0_median']:.3f}; load average {cfg['load']:.1f}"))

    if device == "cuda":
        print("\nmeasured vs roofline prediction (fwd + bwd, this GPU's measured peaks):")
        for d in args.dtypes:
            for s in shapes:
                p = build(s, cfg["batch"], cfg["rank"], d, device)
                pred_f, pred_e = roofline_prediction(p.m, p.k, p.n, p.r, _segments(p), p.x.element_size(),
                                                     *peaks[d], LAUNCH_US)
                got = {r["provider"]: r["time_ms"] for r in rows
                       if r["section"] == "kernel" and r["shape"] == s and r["dtype"] == d and r["mode"] == "full"}
                if "triton" in got and "peft" in got:
                    print(f"  {s:5s} {d}: fused {got['triton']:.3f} ms (pred {pred_f * 1e3:.3f}), eager "
                          f"{got['peft']:.3f} ms (pred {pred_e * 1e3:.3f}); speedup {got['peft'] / got['triton']:.2f}x "
                          f"(pred {pred_e / pred_f:.2f}x)")

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in COLUMNS})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
