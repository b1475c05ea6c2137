"""What the step benches measure, in torch alone: the bench batch and model, time by the clock the
caller chooses, peak memory and saved activations of a step, FLOPs of a step.

Its module-level imports are the standard library and torch, and it makes no relative import: the
peer worker (bench/peers.py), which must import none of this project's packages, loads this file by
its path, and the bench process imports it as `bench.step_measures`. Both sides measure with the
same code.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# wall: time.perf_counter; cpu: time.process_time, the process's CPU time, steadier than wall time on
# a shared, oversubscribed machine (with one thread; it does not see GPU time).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def make_batch(batch: int, size: int, num_classes: int, device: str):
    """The bench batch: random images and labels, the same every time (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    return x, torch.randint(0, num_classes, (batch,), generator=g).to(device)


def base_model(name: str, size: int, num_classes: int, device: str) -> nn.Module:
    """The timm ViT the strategies start from, the same random weights every time (seeded)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=size).to(device)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def call_times(fn: Callable, device: str, calls: int, clock: Callable[[], float] = time.perf_counter,
               warmup: int = 1) -> list[float]:
    """Seconds of each of `calls` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(calls):
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
    return times


def best_time(fn: Callable, device: str, reps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of the fastest of `reps` calls of fn, after one untimed call (the least disturbed
    run: others' work only ever adds time)."""
    return min(call_times(fn, device, reps, clock))


def timed(fn: Callable[[], None], steps: int, device: str) -> float:
    """Seconds of `steps` calls of fn, together (wall clock)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def mode_fn(forward: Callable[[], torch.Tensor], dy: torch.Tensor, mode: str) -> Callable:
    """The callable to time for a forward closure: forward, backward of a retained graph, or full (both)."""
    if mode == "forward":
        return forward
    if mode == "full":
        return lambda: forward().backward(dy)
    y = forward()
    return lambda: y.backward(dy, retain_graph=True)


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_memory_mb(fn: Callable[[], None], device: str) -> float:
    """Peak memory of one call of fn above the memory before it: RSS on the CPU (Linux: the peak is
    reset through /proc/self/clear_refs), max allocated on CUDA."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - before) / 1024


@contextlib.contextmanager
def saved_activations(model: nn.Module):
    """Inside the block, count the bytes of the tensors autograd keeps for backward (unique storages,
    parameters excluded); yields a dict whose "mb" holds the total on the way out."""
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen: dict[int, int] = {}
    total = {"mb": 0.0}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total["mb"] = sum(seen.values()) / 2**20


@contextlib.contextmanager
def _explicit_attention(model: nn.Module):
    # engine.metrics.explicit_attention again: the peer worker may not import engine. timm's unfused
    # attention path, so that every matmul is visible to the FLOP counter.
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in switched:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in switched:
            m.fused_attn = True


def counted_flops(fn: Callable[[], None], model: nn.Module) -> int:
    """FLOPs of one call of fn (FlopCounterMode, timm's explicit attention)."""
    counter = FlopCounterMode(display=False)
    with _explicit_attention(model), counter:
        fn()
    return counter.get_total_flops()


def flops_per_image(model: nn.Module, size: int, train: bool = False) -> int:
    """FLOPs of one image's forward, or (train) forward and backward of the cross-entropy, counted
    as engine.metrics.gflops_per_image counts them (at batch 1); the gradients are dropped after."""
    device = next(model.parameters()).device
    x = torch.randn(1, 3, size, size, device=device)
    was_training = model.training
    model.train(train)

    def step():
        if train:
            F.cross_entropy(model(x), torch.zeros(1, dtype=torch.long, device=device)).backward()
        else:
            with torch.no_grad():
                model(x)
    flops = counted_flops(step, model)
    if train:
        model.zero_grad(set_to_none=True)
    model.train(was_training)
    return flops
