"""The Triton kernels compiled ahead of time for A100, L40S and H100, on this CPU: what each launch
costs on the GPU before anyone rents one.

    python -m bench.triton_aot                  # sm_80, sm_89, sm_90: every rank, dtype, flag (minutes)
    python -m bench.triton_aot --arch sm_90     # one architecture
    python -m bench.triton_aot --representative # every kernel and config once per dtype (under a minute)

For every launch the engine can make (kernels/_aot.py: forward, the x A^T pass and the buffer
launch above the fused rank, the dX pass; fp32 with and without TF32, bf16, fp16; ranks 1 to
kernels.MAX_RANK; bias and residual on and off; one segment (proj) and two (qkv q/v)), compiled at
ViT-B shapes with batch 8 (M = 1,576): shared memory, registers and spills from ptxas, blocks per SM
from the CUDA C++ Programming Guide's per-SM limits, and whether it fits. Beside each row, the
roofline prediction of the fused op and of eager base + LoRA (fwd + bwd, bench/roofline.py) for
that layer at batch 64, from the device's datasheet peaks (named in the `peaks` column): a
prediction, not a measurement. Writes bench/results/triton-aot.{csv,json} (a full run; --out PATH
elsewhere, --representative alone only prints) and exits 1 if any launch does not fit, so
bench/gpu_check.sh stops before GPU time is spent.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .report import RESULTS_DIR, format_table, write_results
from .roofline import DATASHEET_PEAKS, roofline_prediction

ARCHS = ("sm_80", "sm_89", "sm_90")
PREDICT_BATCH = 64
TOKENS = 197
LAYERS = {"qkv": (768, 2304, (768, 768)), "proj": (768, 768, (768,))}  # K, N, segment widths (as kernels/_aot.py)
COLUMNS = ("kernel", "arch", "device", "dtype", "rank", "layer", "segments", "bias", "residual", "config",
           "shared", "smem_limit", "regs", "spill_stores", "spill_loads", "blocks_per_sm", "fits", "problem",
           "fused_us_b64", "eager_us_b64", "peaks")
PEAK_KEY = {"fp32-ieee": "fp32", "fp32-tf32": "tf32", "bf16": "bf16", "fp16": "fp16"}
ELEMENT = {"fp32-ieee": 4, "fp32-tf32": 4, "bf16": 2, "fp16": 2}


def compile_tables(archs, representative: bool, jobs: int) -> list[dict]:
    """Rows of `python -m kernels._aot --json`, one fresh process per architecture (an interpreted
    kernel cannot be compiled, and fresh processes run side by side), `jobs` at a time."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    rows, pending = [], list(archs)
    while pending:
        batch, pending = pending[:jobs], pending[jobs:]
        procs = [(arch, subprocess.Popen([sys.executable, "-m", "kernels._aot", "--arch", arch, "--json"]
                                         + (["--representative"] if representative else []),
                                         cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)) for arch in batch]
        for arch, proc in procs:
            out, err = proc.communicate()
            if not out.strip():
                raise SystemExit(f"error: compiling for {arch} failed:\n{err[-2000:]}")
            rows += json.loads(out)
    return rows


def add_predictions(rows: list[dict]) -> None:
    """fused_us_b64 / eager_us_b64: the roofline prediction of the layer at batch 64 (datasheet peaks)."""
    from kernels._aot import DEVICES
    for r in rows:
        r["smem_limit"] = DEVICES[r["arch"]].smem_per_block
        peaks = DATASHEET_PEAKS[r["arch"]]
        r["peaks"] = peaks["source"]
        if r["rank"] == 0:
            continue
        k, n, widths = LAYERS[r["layer"]]
        fused, eager = roofline_prediction(PREDICT_BATCH * TOKENS, k, n, r["rank"], list(widths), ELEMENT[r["dtype"]],
                                           peaks["gflops"][PEAK_KEY[r["dtype"]]], peaks["gbps"])
        r["fused_us_b64"], r["eager_us_b64"] = round(fused * 1e6, 1), round(eager * 1e6, 1)


def summary(rows: list[dict]) -> list[dict]:
    """One line per (kernel, arch, dtype, config): the worst case over its ranks and flags."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["arch"], r["dtype"], r["config"])
        g = groups.setdefault(key, dict(kernel=r["kernel"], arch=r["arch"], dtype=r["dtype"], config=r["config"],
                                        ranks=set(), launches=0, shared=0, regs=0, spills=0, blocks_per_sm=99,
                                        fits=True))
        g["ranks"].add(r["rank"])
        g["launches"] += 1
        g["shared"] = max(g["shared"], r.get("shared") or 0)
        g["regs"] = max(g["regs"], r.get("regs") or 0)
        g["spills"] = max(g["spills"], (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0))
        g["blocks_per_sm"] = min(g["blocks_per_sm"], r["blocks_per_sm"])
        g["fits"] = g["fits"] and r["fits"]
    for g in groups.values():
        g["ranks"] = ",".join(str(x) for x in sorted(g["ranks"]))
    return list(groups.values())


def predictions(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        key = (r["arch"], r["dtype"], r["layer"], r["rank"])
        if r["rank"] and key not in seen and r["kernel"] in ("forward", "forward-buffer"):
            seen.add(key)
            out.append(dict(arch=r["arch"], device=DATASHEET_PEAKS[r["arch"]]["device"], dtype=r["dtype"],
                            layer=r["layer"], rank=r["rank"], fused_us=r["fused_us_b64"], eager_us=r["eager_us_b64"],
                            predicted_speedup=round(r["eager_us_b64"] / r["fused_us_b64"], 2)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.triton_aot", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--representative", action="store_true",
                        help="every kernel and config once per dtype, not every rank and flag; prints only "
                             "unless --out")
    parser.add_argument("--jobs", type=int, default=2, help="architectures compiled side by side (default 2)")
    parser.add_argument("--out", type=Path, metavar="PATH", help="write PATH.csv and PATH.json instead")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    command = " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)])

    rows = compile_tables(args.arch, args.representative, args.jobs)
    add_predictions(rows)
    print(format_table(summary(rows), ("kernel", "arch", "dtype", "config", "ranks", "launches", "shared", "regs",
                                       "spills", "blocks_per_sm", "fits"), markdown=args.markdown))
    print(f"\nroofline prediction, fwd + bwd, ViT-B batch {PREDICT_BATCH}, from datasheet peaks (not measured):")
    print(format_table(predictions(rows), ("arch", "device", "dtype", "layer", "rank", "fused_us", "eager_us",
                                           "predicted_speedup"), markdown=args.markdown))
    bad = [r for r in rows if not r["fits"]]
    for r in bad[:20]:
        print(f"does not fit: {r['kernel']} {r['arch']} {r['dtype']} rank {r['rank']} {r['layer']} "
              f"{r['config']}: {r['problem']}", file=sys.stderr)
    stem = args.out.with_suffix("") if args.out else (None if args.representative else RESULTS_DIR / "triton-aot")
    if stem is not None:
        paths = write_results(stem, rows, COLUMNS, {"command": command})
        print("\nwrote " + " and ".join(str(p) for p in paths))
    print(f"\n{len(rows)} launches, {len(bad)} do not fit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
