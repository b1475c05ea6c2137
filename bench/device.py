"""The name of the machine a benchmark ran on, for result file names and rows."""
from __future__ import annotations

import platform
import re

import torch


def device_name() -> str:
    """`cuda-<gpu model>` on a GPU, `cpu-<cpu model>-<n>c` elsewhere, file-name safe."""
    if torch.cuda.is_available():
        name = f"cuda-{torch.cuda.get_device_name()}"
    else:
        model = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"cpu-{model}-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name.strip()).strip("-").lower()
