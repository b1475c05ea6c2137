"""HF peft, the benches' peer, in a worker process of its own.

transformers, which peft imports, imports Hugging Face's distribution `kernels` at start-up, and in
any process that imports this project (engine, bench, adapters or kernels) that name is this
project's `kernels`. So peft runs in a worker: this file run as a script in isolated mode,
`python -I bench/peers.py`, where neither the working directory nor bench/ is on sys.path (bench/
holds a kernels.py too). The worker imports torch, timm and peft, loads bench/step_measures.py by
its path (the same measurements as the bench process), and imports none of this project's packages.
The bench process talks to it through `PeerWorker`: this module's own imports are the standard
library only, so `from bench.peers import PeerWorker` imports no peft.

Protocol: one JSON object a line. A request {"op": name, "threads": n, ...arguments} (n: the caller's
torch threads, which the worker takes); the reply {"ok": true, "result": ...} or {"ok": false,
"error": the exception's line, "traceback": its text}, raised in the caller as `PeerError`. Tensors
travel through torch.save files in a temporary folder the client owns. The worker's stdout carries
the protocol alone (its own and the libraries' prints go to stderr); it exits when its stdin closes.

Ops: `modules` (what the worker has imported), the kernel bench's `lora_layer` / `lora_times` /
`lora_outputs` (HF peft's LoRA Linear on a problem's tensors), the step bench's `peft_vit` /
`peft_warmup` / `peft_timed` (a timm ViT with peft's LoRA and the engine's optimiser), and `drop`.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

WORKER = Path(__file__).resolve()
CLOCK_NAMES = ("perf_counter", "process_time")  # the time module's clocks a caller may time by


def peft_can_express(segments, n: int) -> bool:
    """True when HF peft does a LoRA-linear problem's own work: one LoRA over the whole output
    (`segments`: (start, width) pairs; `n`: the output width). It cannot put LoRA on only q and v of
    timm's fused qkv (huggingface/peft#1705)."""
    return tuple(map(tuple, segments)) == ((0, n),)


class PeerError(RuntimeError):
    """An error inside the peer worker: its message and traceback, or how the worker ended."""


# --------------------------------------------------------------------------------------------------
# The client, in the bench process

class PeerWorker:
    """The worker process, started on the first call; a context manager that closes it."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._files = 0
        self._layers: set[str] = set()

    def __enter__(self) -> "PeerWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        if self._proc is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bench-peers-")
            self._proc = subprocess.Popen([sys.executable, "-I", str(WORKER)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, bufsize=1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def call(self, op: str, **args):
        """The result of `op` in the worker; PeerError with the worker's traceback if it raised there."""
        import torch  # the caller's threads; the bench process has torch imported already

        self._start()
        try:
            self._proc.stdin.write(json.dumps({"op": op, "threads": torch.get_num_threads(), **args}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker has ended: the read below says so
        line = self._proc.stdout.readline()
        if not line:
            raise PeerError(f"the peer worker (pid {self._proc.pid}) ended (exit {self._proc.wait()}) during {op!r}; "
                            "its stderr above says why")
        reply = json.loads(line)
        if not reply["ok"]:
            raise PeerError(f"{reply['error']}\n\nin the peer worker (pid {self._proc.pid}):\n{reply['traceback']}")
        return reply["result"]

    def close(self) -> int | None:
        """Close the worker's stdin and wait for it to end; its exit code (None: never started)."""
        if self._proc is None:
            return None
        proc, self._proc = self._proc, None
        try:
            proc.stdin.close()
        except BrokenPipeError:  # it had ended already
            pass
        code = proc.wait(60)
        proc.stdout.close()
        self._tmp.cleanup()
        self._layers.clear()
        return code

    def _tensor_file(self, tensors: dict) -> str:
        import torch

        self._files += 1
        path = Path(self._tmp.name) / f"{self._files}.pt"
        torch.save(tensors, path)
        return str(path)

    def lora_layer(self, key: str, x, weight, bias, lora_a, lora_b, starts, dy, scale: float) -> str:
        """HF peft's LoRA Linear on these tensors (a LoRA-linear problem, bench/lora_problems.py) in the
        worker, under `key` (built once per key); the key."""
        if key not in self._layers:
            tensors = {"x": x.detach(), "weight": weight.detach(), "bias": bias.detach(),
                       "lora_a": [a.detach() for a in lora_a], "lora_b": [b.detach() for b in lora_b],
                       "dy": dy.detach(), "starts": list(starts), "scale": float(scale)}
            self._start()
            path = self._tensor_file(tensors)
            try:
                self.call("lora_layer", key=key, path=path)
            finally:
                os.unlink(path)
            self._layers.add(key)
        return key

    def lora_times(self, key: str, mode: str, calls: int, clock=time.perf_counter) -> list[float]:
        """Seconds of each of `calls` calls of the layer's `mode` in the worker, after one untimed call,
        by the worker's own `clock` (time.perf_counter or time.process_time: the worker's CPU time)."""
        if clock.__name__ not in CLOCK_NAMES:
            raise ValueError(f"clock {clock!r}: the worker times by time.{' or time.'.join(CLOCK_NAMES)}")
        return self.call("lora_times", key=key, mode=mode, calls=calls, clock=clock.__name__)

    def lora_outputs(self, key: str) -> dict:
        """The layer's output y on x, and the gradients of y . dy with respect to x and peft's A and B
        ("dx", "da", "db", tensors), with what the layer is ("class", "base_frozen", "lora_b_shape")."""
        import torch

        self._start()
        path = Path(self._tmp.name) / f"{key}-outputs.pt"
        about = self.call("lora_outputs", key=key, path=str(path))
        try:
            return {**about, **torch.load(path, weights_only=True)}
        finally:
            path.unlink()


_SHARED: PeerWorker | None = None


def shared() -> PeerWorker:
    """This process's own worker, which the benches and the tests share (the kernel bench's table
    and ratios, the step bench's peft rows): started on first use, closed when the process exits."""
    global _SHARED
    if _SHARED is None:
        _SHARED = PeerWorker()
        atexit.register(_SHARED.close)
    return _SHARED


# --------------------------------------------------------------------------------------------------
# The worker: what runs in `python -I bench/peers.py`

_STATE: dict[str, dict] = {}  # key -> what an op built
TORCH_FREE_OPS = ("modules", "drop")  # they touch no tensor: torch need not be imported (nor threads set) for them


def _measures():
    """bench/step_measures.py, loaded by its path (bench/ on sys.path would make bench/kernels.py `kernels`)."""
    if "_step_measures" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_step_measures", WORKER.with_name("step_measures.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["_step_measures"] = module
        spec.loader.exec_module(module)
    return sys.modules["_step_measures"]


def _peft_version() -> str:
    import peft
    return peft.__version__


def op_modules() -> dict:
    """Where the names this project shares with other distributions come from here, and whether
    this project's other packages are imported (they must not be)."""
    return {name: getattr(sys.modules[name], "__file__", None)
            for name in ("kernels", "adapters", "engine", "bench") if name in sys.modules}


def op_drop(keys: list[str]) -> None:
    for key in keys:
        _STATE.pop(key, None)


def op_lora_layer(key: str, path: str) -> dict:
    """HF peft's LoRA layer (`peft.tuners.lora.Linear`) on the problem's frozen Linear, built as a
    user builds it: `get_peft_model` with a `LoraConfig` on a module holding the Linear. A and B are
    the problem's where `peft_can_express`; elsewhere (qkv) peft wraps the whole layer: A of the
    first segment, B with the segments' rows and zeros between (different work). peft would keep
    16-bit adapters in fp32 by default (autocast_adapter_dtype); here they hold the problem's dtype,
    as in every other provider."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    t = torch.load(path, weights_only=True)
    weight, bias, lora_a, lora_b = t["weight"], t["bias"], t["lora_a"], t["lora_b"]
    n, r = weight.shape[0], lora_a[0].shape[0]

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(weight.shape[1], n, device="meta")
            self.layer.weight = nn.Parameter(weight, requires_grad=False)
            self.layer.bias = nn.Parameter(bias, requires_grad=False)

        def forward(self, x):
            return self.layer(x)

    alpha = t["scale"] * r  # peft's scaling is lora_alpha / r
    config = LoraConfig(r=r, lora_alpha=int(alpha) if alpha == int(alpha) else alpha, target_modules=["layer"])
    layer = get_peft_model(Holder(), config, autocast_adapter_dtype=False).base_model.model.layer
    segments = [(s, b.shape[0]) for s, b in zip(t["starts"], lora_b)]
    b = lora_b[0]
    if not peft_can_express(segments, n):
        b = torch.zeros(n, r, device=weight.device, dtype=weight.dtype)
        for (start, width), b_i in zip(segments, lora_b):
            b[start:start + width] = b_i
    layer.lora_A["default"].weight = nn.Parameter(lora_a[0])
    layer.lora_B["default"].weight = nn.Parameter(b)
    x = t["x"].requires_grad_()
    _STATE[key] = {"layer": layer, "x": x, "dy": t["dy"], "device": str(x.device)}
    return {"peft": _peft_version()}


def _lora_grads(s: dict) -> list:
    layer = s["layer"]
    return [s["x"], layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def op_lora_times(key: str, mode: str, calls: int, clock: str) -> list[float]:
    """As the kernel bench times its other providers: one untimed call, then `calls` timed ones; the
    gradients accumulate across them and are dropped at the end (pytest-benchmark's cases do the same)."""
    if clock not in CLOCK_NAMES:
        raise ValueError(f"unknown clock {clock!r}")
    sm, s = _measures(), _STATE[key]
    fn = sm.mode_fn(lambda: s["layer"](s["x"]), s["dy"], mode)
    times = sm.call_times(fn, s["device"], calls, getattr(time, clock))
    for t in _lora_grads(s):
        t.grad = None
    return times


def op_lora_outputs(key: str, path: str) -> dict:
    import torch

    s = _STATE[key]
    layer = s["layer"]
    y = layer(s["x"])
    dx, da, db = torch.autograd.grad(y, _lora_grads(s), s["dy"])
    torch.save({"y": y.detach(), "dx": dx, "da": da, "db": db}, path)
    return {"class": f"{type(layer).__module__}.{type(layer).__name__}",
            "base_frozen": not any(t.requires_grad for t in layer.base_layer.parameters()),
            "lora_b_shape": list(layer.lora_B["default"].weight.shape)}


def op_peft_vit(label: str, model: str, img_size: int, num_classes: int, batch: int, device: str,
                target_modules: str, rank: int, optimizer: dict, amp: str | None) -> dict:
    """The step bench's peft row: the bench's timm model with peft's LoRA (`get_peft_model`, a
    `LoraConfig` whose regex `target_modules` is fully matched, the new head in `modules_to_save`),
    trained by the engine's optimiser as the bench process describes it (`optimizer`: timm's name,
    lr, momentum, weight decay over timm's parameter groups, as engine.optim.make_optimizer builds
    it); its counts, and the finalised model (merge_and_unload, on a copy) for the inference rounds."""
    import copy
    import contextlib

    import timm.optim
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    sm = _measures()
    x, y = sm.make_batch(batch, img_size, num_classes, device)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules, modules_to_save=["head"])
    peft_model = get_peft_model(sm.base_model(model, img_size, num_classes, device), config).train()
    groups = timm.optim.param_groups_weight_decay(
        peft_model, weight_decay=optimizer["weight_decay"],
        no_weight_decay_list=tuple(getattr(peft_model, "no_weight_decay", set)()))
    opt = timm.optim.create_optimizer_v2(groups, opt=optimizer["opt"], lr=optimizer["lr"],
                                         momentum=optimizer["momentum"])

    def under_amp():
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, amp))

    def train():
        with under_amp():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(peft_model(x), y).backward()
            opt.step()

    infer_model = copy.deepcopy(peft_model).merge_and_unload().eval()

    @torch.no_grad()
    def infer():
        with under_amp():
            infer_model(x)
    info = {"peft": _peft_version(),
            "trainable_params": sum(q.numel() for q in peft_model.parameters() if q.requires_grad),
            "train_flops": sm.flops_per_image(peft_model, img_size, train=True),
            "infer_flops": sm.flops_per_image(infer_model, img_size),
            "optimizer": {"class": type(opt).__name__,
                          "groups": [{k: v for k, v in g.items() if k != "params"} | {"numel": sum(
                              q.numel() for q in g["params"])} for g in opt.param_groups]}}
    _STATE[label] = {"model": peft_model, "train": train, "infer": infer, "device": device}
    return info


def op_peft_warmup(label: str) -> dict:
    """The warm-up train step, measured for peak memory (its optimiser state is new) and the
    activations autograd saves; then one finalised forward."""
    sm, s = _measures(), _STATE[label]
    with sm.saved_activations(s["model"]) as saved:
        memory = sm.step_memory_mb(s["train"], s["device"])
    s["infer"]()
    return {"peak_mem_mb": memory, "saved_activations_mb": saved["mb"]}


def op_peft_timed(label: str, what: str, steps: int) -> float:
    """Seconds of `steps` train steps (what="train") or finalised forwards ("infer"), together."""
    s = _STATE[label]
    return _measures().timed(s[what], steps, s["device"])


def serve() -> None:
    """Answer requests on stdin until it closes; stdout carries the replies alone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bench process's; this one ends with its stdin
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever anything prints, C libraries included, goes to stderr
    sys.stdout = sys.stderr
    ops = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            op, threads = request.pop("op"), request.pop("threads", None)
            if threads and op not in TORCH_FREE_OPS:
                import torch
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
            if op not in ops:
                raise ValueError(f"unknown op {op!r}; the worker knows {', '.join(ops)}")
            reply = json.dumps({"ok": True, "result": ops[op](**request)})
        except Exception as e:
            reply = json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        protocol.write(reply + "\n")


if __name__ == "__main__":
    serve()
