"""The Triton kernels compiled ahead of time for A100 (sm_80) and H100 (sm_90) on this CPU: every
kernel kind and launch configuration the engine can pick, for every dtype (kernels/_aot.py,
representative_problems), compiles and fits the device: shared memory within the per-block limit,
at most 255 registers per thread, no register spills, at least one block per SM.

The compilation runs in fresh processes (one per architecture, side by side): this session's kernel
tests interpret the kernels, and an interpreted kernel cannot be compiled. The full matrix (every
rank, both flags, sm_89 too) is `python -m bench.triton_aot` (bench/results/triton-aot.csv).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

from kernels import MAX_RANK  # noqa: E402
from kernels._aot import DEVICES, occupancy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def compiled():
    """{arch: rows} from `python -m kernels._aot --representative --json`, the archs in parallel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = {arch: subprocess.Popen([sys.executable, "-m", "kernels._aot", "--arch", arch, "--representative",
                                     "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for arch in ARCHS}
    out = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert stdout.strip(), f"kernels._aot --arch {arch} printed no table:\n{stderr[-3000:]}"
        out[arch] = json.loads(stdout)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_compiles_and_fits_the_device(compiled, arch):
    rows = compiled[arch]
    bad = [f"{r['kernel']} {r['dtype']} rank {r['rank']} {r['layer']} bias={r['bias']} res={r['residual']} "
           f"{r['config']}: {r['problem']}" for r in rows if not r["fits"]]
    assert not bad, f"{len(bad)} launches do not fit {DEVICES[arch].name}:\n" + "\n".join(bad)
    for r in rows:
        assert 0 < r["shared"] <= DEVICES[arch].smem_per_block
        assert 0 < r["regs"] <= 255 and r["spill_stores"] == r["spill_loads"] == 0
        assert r["blocks_per_sm"] >= 1


@pytest.mark.parametrize("arch", ARCHS)
def test_the_matrix_covers_every_kernel_dtype_and_the_largest_rank(compiled, arch):
    rows = compiled[arch]
    kinds = {(r["kernel"], r["dtype"]) for r in rows}
    for dtype in ("fp32-ieee", "fp32-tf32", "bf16", "fp16"):
        for kind in ("base", "forward", "xa", "forward-buffer", "dx", "dx-buffer"):
            assert (kind, dtype) in kinds
    assert max(r["rank"] for r in rows) == MAX_RANK and any(r["rank"] == 128 for r in rows)
    assert {r["segments"] for r in rows if r["rank"]} == {1, 2}
    assert {(r["bias"], r["residual"]) for r in rows if r["kernel"] == "forward"} >= {(False, False), (True, True)}


def test_occupancy_takes_the_tightest_limit():
    h100 = DEVICES["sm_90"]
    assert occupancy(h100, shared=0, regs=32, num_warps=4) == 16  # threads: 2048 / 128
    assert occupancy(h100, shared=100 * 1024, regs=32, num_warps=4) == 2  # (228 KB) / (100 KB + 1 KB)
    assert occupancy(h100, shared=1024, regs=255, num_warps=8) == 1  # 256 regs x 256 threads = 64K
    assert occupancy(h100, shared=230 * 1024, regs=32, num_warps=4) == 0


@pytest.mark.parametrize("capability, arch", [((9, 0), "hopper"), ((8, 0), "ampere"), ((8, 6), "ampere"),
                                              ((8, 9), "ampere"), ((10, 0), "ampere"), ((12, 0), "ampere")])
def test_only_sm_90_takes_the_hopper_tiles(monkeypatch, capability, arch):
    """The hopper tiles need up to 104 KB of shared memory and are checked for sm_90 alone; a GPU
    outside the table (sm_100, sm_120) takes the ampere tiles, the smallest, checked to fit 99 KB."""
    import torch

    import kernels._triton_lora as triton_lora
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert triton_lora._arch(torch.device("cuda")) == arch
