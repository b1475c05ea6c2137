"""Ahead-of-time compilation of the Triton kernels for GPUs this machine does not have.

Triton compiles for any NVIDIA architecture on a CPU: the wheel ships ptxas. So every launch the
engine can make is compiled here for sm_80 (A100), sm_89 (L40S) and sm_90 (H100), and its
resources are checked against the device's limits before anyone rents one:

    launches(arch, dtype, rank, ...)  the launches lora_forward / lora_input_grad make on that GPU,
                                      recorded on meta tensors (kernels._triton_lora.planning), with
                                      the JIT's own specialisation of every argument (an int 1 is a
                                      constant, a multiple of 16 is marked divisible, as at launch);
    compile_launch(args, kwargs, dev) triton.compile for the target; shared memory from Triton's
                                      metadata, registers and spills from its ptxas -v log (ptxas
                                      rerun on the PTX when the kernel came from Triton's cache);
    occupancy(...)                    blocks per SM from the per-SM limits below.

Limits: CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" table
(shared memory per SM and per block with the opt-in, 1 KB reserved per block, 64K 32-bit registers
per SM, 255 per thread, resident threads and blocks per SM). Values a real launch would also check:
Triton refuses a launch whose shared memory exceeds the device's per-block opt-in maximum.

A process that interpreted the kernels (TRITON_INTERPRET=1, the kernel tests) cannot compile them:
the kernels and triton.language's helpers were decorated as interpreted functions. `main` runs in
a fresh process: `python -m kernels._aot --arch sm_90 --json` (tests/kernels/test_triton_aot.py).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .lora_linear import MAX_RANK  # the largest rank the engine accepts (adapters refuse more)


@dataclass(frozen=True)
class Device:
    """Per-architecture limits (CUDA C++ Programming Guide, compute capabilities table)."""
    name: str                 # the part the row stands for
    capability: int           # 80 -> sm_80
    arch: str                 # kernels/_triton_lora.py's CONFIGS key
    smem_per_block: int       # bytes, the opt-in maximum of one block
    smem_per_sm: int          # bytes
    regs_per_sm: int = 65536
    regs_per_thread: int = 255
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    reserved_smem_per_block: int = 1024


KB = 1024
DEVICES = {
    "sm_80": Device("A100", 80, "ampere", smem_per_block=163 * KB, smem_per_sm=164 * KB),
    "sm_89": Device("L40S", 89, "ampere", smem_per_block=99 * KB, smem_per_sm=100 * KB, threads_per_sm=1536,
                    blocks_per_sm=24),
    "sm_90": Device("H100", 90, "hopper", smem_per_block=227 * KB, smem_per_sm=228 * KB),
}

# dtype label -> (torch dtype, torch.backends.cuda.matmul.allow_tf32): fp32 runs both ways (_precision)
DTYPES = {"fp32-ieee": (torch.float32, False), "fp32-tf32": (torch.float32, True),
          "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None)}
RANKS = (1, 4, 8, 16, 32, 64, 128, MAX_RANK)

# ViT-B layers: name -> (K, N, segments as (start, width)); qkv carries q and v (two segments)
LAYERS = {"qkv": (768, 2304, ((0, 768), (1536, 768))), "proj": (768, 768, ((0, 768),)),
          "fc1": (768, 3072, ((0, 3072),)), "fc2": (3072, 768, ((0, 768),))}
TOKENS = 197  # ViT-B/16 at 224 px: 196 patches + CLS


@functools.lru_cache(maxsize=None)
def kernel_module():
    """kernels/_triton_lora.py with its @triton.jit functions compiled (not interpreted)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: interpreted kernels cannot be compiled ahead of time "
                           "(run `python -m kernels._aot` in a process without it)")
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    if not isinstance(tl.zeros, JITFunction):
        raise RuntimeError("triton.language's helpers are interpreted in this process (the kernel tests' "
                           "fixture): compile ahead of time in a fresh process, `python -m kernels._aot`")
    from . import _triton_lora
    return _triton_lora


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def launches(arch, dtype, allow_tf32, rank, layer, *, bias, residual, pass_):
    """What lora_forward (pass_ "forward") or lora_input_grad ("dx") launches on `arch` for a ViT-B
    layer at batch 8 with `rank` per segment: [(kind, args, kwargs)]."""
    mod = kernel_module()
    k, n, segments = LAYERS[layer]
    m = 8 * TOKENS
    weight = _meta((n, k), dtype)
    a_list = [_meta((rank, k), dtype) for _ in segments]
    b_list = [_meta((w, rank), dtype) for _, w in segments]
    starts = [s for s, _ in segments]
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        if allow_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        with mod.planning(arch) as planned:
            if pass_ == "forward":
                mod.lora_forward(_meta((m, k), dtype), weight, _meta((n,), dtype) if bias else None, a_list,
                                 b_list, starts, 0.5, _meta((m, n), dtype) if residual else None)
            elif pass_ == "base":
                mod.lora_forward(_meta((m, k), dtype), weight, _meta((n,), dtype) if bias else None, [], [], [],
                                 0.5, _meta((m, n), dtype) if residual else None)
            else:
                mod.lora_input_grad(_meta((m, n), dtype), weight, a_list, b_list, starts, 0.5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return [(kind, args, kwargs) for kind, _, args, kwargs in planned]


def specialise(args, kwargs, device: Device):
    """(signature, constexprs, attrs, options) as the JIT derives them at launch (_pack_args)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = kernel_module()._lora_mm_kernel
    backend = make_backend(GPUTarget("cuda", device.capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    names = [p.name for p in fn.params]
    signature = {name: s[0] for name, s in zip(names, spec)}
    constexprs = {(i,): bound[name] for i, (name, s) in enumerate(zip(names, spec)) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str) and s[1]}
    return signature, constexprs, attrs, dict(num_warps=options["num_warps"], num_stages=options["num_stages"])


def _key(signature, constexprs, attrs, options, device):
    return json.dumps([device.capability, signature, sorted((k, repr(v)) for k, v in constexprs.items()),
                       sorted((k, repr(v)) for k, v in attrs.items()), options], default=str)


_COMPILED: dict[str, dict] = {}  # one compilation per distinct specialisation, within a process


def compile_launch(args, kwargs, device: Device) -> dict:
    """Compile one launch for `device`: shared memory (bytes), registers per thread, spill bytes, stack."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, constexprs, attrs, options = specialise(args, kwargs, device)
    key = _key(signature, constexprs, attrs, options, device)
    if key not in _COMPILED:
        from triton import knobs
        fn = kernel_module()._lora_mm_kernel
        log = io.StringIO()
        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log: read it, no second run
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                        target=GPUTarget("cuda", device.capability, 32), options=options)
        except Exception as e:  # a config the compiler refuses is a finding, not a crash of the table
            _COMPILED[key] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        else:
            usage = _parse_ptxas(log.getvalue())
            if usage is None:  # from Triton's cache: ptxas did not run
                usage = _ptxas_usage(kernel.asm["ptx"], device)
            _COMPILED[key] = dict(shared=kernel.metadata.shared, **usage)
        finally:
            knobs.nvidia.dump_ptxas_log = old
    return _COMPILED[key]


def _parse_ptxas(log: str):
    """Registers, spill stores and loads, stack frame from a `ptxas -v` log; None if it holds none."""
    def grab(pattern):
        hit = re.search(pattern, log)
        return int(hit.group(1)) if hit else 0
    if not re.search(r"Used \d+ registers", log):
        return None
    return dict(regs=grab(r"Used (\d+) registers"), stack=grab(r"(\d+) bytes stack frame"),
                spill_stores=grab(r"(\d+) bytes spill stores"), spill_loads=grab(r"(\d+) bytes spill loads"))


def _ptxas_usage(ptx: str, device: Device) -> dict:
    """Registers, spill stores and loads, stack frame: `ptxas -v` on the kernel's PTX (the flags Triton uses)."""
    from triton import knobs
    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{device.capability}a"
                              if device.capability == 90 else f"--gpu-name=sm_{device.capability}",
                              str(src), "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    usage = _parse_ptxas(out.stderr) if out.returncode == 0 else None
    if usage is None:
        return dict(regs=-1, spill_stores=-1, spill_loads=-1, stack=-1, ptxas_error=out.stderr.strip()[-300:])
    return usage


def occupancy(device: Device, shared: int, regs: int, num_warps: int) -> int:
    """Resident blocks per SM: the least of the thread, block, register and shared-memory limits.
    Registers are allocated per warp in units of 256 (the CUDA occupancy calculator's granularity)."""
    threads = 32 * num_warps
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (device.regs_per_sm // regs_per_warp) // num_warps
    by_smem = device.smem_per_sm // (shared + device.reserved_smem_per_block)
    return max(0, min(device.blocks_per_sm, device.threads_per_sm // threads, by_regs, by_smem))


def config_label(kwargs) -> str:
    return (f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_P']}x{kwargs['BLOCK_Q']} R{kwargs['BLOCK_R']} "
            f"w{kwargs['num_warps']} s{kwargs['num_stages']}")


def problems(ranks=RANKS, dtypes=tuple(DTYPES)):
    """The matrix the engine can launch: (pass, dtype, rank, layer, bias, residual). Forward has a
    bias and a residual on or off; the dX pass has neither; one segment (proj) and two (qkv q/v);
    the base GEMM alone (a LoRA module whose segments are all gated off) at rank 0."""
    for dtype in dtypes:
        for bias in (False, True):
            for residual in (False, True):
                yield "base", dtype, 0, "proj", bias, residual
        for rank in ranks:
            for layer in ("proj", "qkv"):
                for bias in (False, True):
                    for residual in (False, True):
                        yield "forward", dtype, rank, layer, bias, residual
                yield "dx", dtype, rank, layer, False, False


def representative_problems(dtypes=tuple(DTYPES)):
    """Every kernel kind and every distinct config once per dtype, with fewer rank and flag
    combinations: the rank changes BLOCK_R only up to the fused limit (R 16 and 64 here), and above it
    (128 and the maximum) the compiled code is the same. Bias and residual both on and both off, one
    and two segments."""
    for dtype in dtypes:
        yield "base", dtype, 0, "proj", True, True
        yield "forward", dtype, 1, "proj", False, False       # R 16, fused everywhere, one segment
        yield "forward", dtype, 32, "qkv", True, True         # R 64: fused, or precomputed for plain fp32
        yield "forward", dtype, 128, "qkv", True, True        # precomputed: x A^T pass + buffer launch
        yield "forward", dtype, MAX_RANK, "proj", True, False
        yield "dx", dtype, 1, "proj", False, False
        yield "dx", dtype, 32, "qkv", False, False
        yield "dx", dtype, 128, "qkv", False, False
        yield "dx", dtype, MAX_RANK, "proj", False, False


def table(arch: str, ranks=RANKS, dtypes=tuple(DTYPES), representative=False) -> list[dict]:
    """One row per launch of every problem on `arch` (compiled once per distinct specialisation)."""
    device = DEVICES[arch]
    rows = []
    todo = representative_problems(dtypes) if representative else problems(ranks, dtypes)
    for pass_, dtype, rank, layer, bias, residual in todo:
        torch_dtype, tf32 = DTYPES[dtype]
        for kind, args, kwargs in launches(device.arch, torch_dtype, tf32, rank, layer, bias=bias,
                                           residual=residual, pass_=pass_):
            usage = compile_launch(args, kwargs, device)
            row = dict(kernel=kind, arch=arch, device=device.name, dtype=dtype, rank=rank, layer=layer,
                       segments=len(LAYERS[layer][2]) if rank else 0, bias=bias, residual=residual,
                       config=config_label(kwargs), num_warps=kwargs["num_warps"], **usage)
            row.update(check(row, device))
            rows.append(row)
    return rows


def check(row: dict, device: Device) -> dict:
    """fits (bool), blocks_per_sm and the reason when it does not fit: a compile error, shared memory
    over the block limit, registers over 255, or spills."""
    if "error" in row:
        return dict(fits=False, blocks_per_sm=0, problem=f"does not compile: {row['error']}")
    problems_ = []
    if row["shared"] > device.smem_per_block:
        problems_.append(f"shared memory {row['shared']} B > {device.name}'s {device.smem_per_block} B per block")
    if row["regs"] > device.regs_per_thread or row["regs"] < 0:
        problems_.append(f"registers {row['regs']} > {device.regs_per_thread}")
    if row["spill_stores"] or row["spill_loads"]:
        problems_.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    blocks = occupancy(device, row["shared"], row["regs"], row["num_warps"]) if not problems_ else 0
    if not problems_ and blocks == 0:
        problems_.append("no block fits on an SM")
    return dict(fits=not problems_, blocks_per_sm=blocks, problem="; ".join(problems_))


def distinct(rows):
    """The rows of distinct (kernel, arch, dtype, config, segments, bias, residual): the table a test reads."""
    seen, out = set(), []
    for r in rows:
        key = (r["kernel"], r["arch"], r["dtype"], r["config"], r["segments"] > 1, r["bias"], r["residual"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kernels._aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=list(DEVICES), default=["sm_80", "sm_90"])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--representative", action="store_true",
                        help="every kernel and config once per dtype (representative_problems), not every rank")
    parser.add_argument("--json", action="store_true", help="one JSON list of rows on stdout")
    args = parser.parse_args(argv)
    rows = [r for arch in args.arch
            for r in table(arch, tuple(args.ranks), tuple(args.dtypes), args.representative)]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['kernel']:14} {r['arch']} {r['dtype']:9} r{r['rank']:<4} {r['layer']:4} bias={r['bias']:d} "
                  f"res={r['residual']:d} {r['config']:22} smem {r.get('shared', '-'):>7} regs {r.get('regs', '-'):>3} "
                  f"spills {r.get('spill_stores', '-')}/{r.get('spill_loads', '-')} blocks/SM {r['blocks_per_sm']} "
                  f"{'ok' if r['fits'] else 'NO: ' + r['problem']}")
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
