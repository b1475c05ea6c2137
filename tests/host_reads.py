"""A spy on host reads (`.item()`, `float()`, `bool()`, `int()`, `.tolist()`: a sync on a GPU) that the
project's own code makes during training, each recorded with the step whose `extra_loss` ran last."""
import sys
from pathlib import Path

import torch

from adapters.base import Strategy

ROOT = Path(__file__).resolve().parents[1]
OURS = tuple(str(ROOT / pkg) for pkg in ("engine", "adapters", "kernels"))


def spy_on_host_reads(monkeypatch) -> list[tuple[int, str, str]]:
    """Patch torch.Tensor's reading methods through `monkeypatch`; returns the (step, method, caller
    file) list the reads are appended to. Reads before the first step are not recorded."""
    current = {"step": None}
    reads = []

    def extra_loss(self, model, step, total_steps):
        current["step"] = step
        return None

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if current["step"] is not None and caller.startswith(OURS):
                reads.append((current["step"], name, caller))
            return original(self, *args, **kwargs)
        return read

    monkeypatch.setattr(Strategy, "extra_loss", extra_loss)
    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    return reads
