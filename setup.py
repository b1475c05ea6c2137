"""Kernel-optimised fine-tuning of pre-trained ViTs without catastrophic forgetting."""
import os
import sys

# This folder off sys.path: setuptools runs other distributions' plugins (Hugging Face's `kernels`
# registers an egg_info writer), and our kernels/ would answer their imports (pip --no-build-isolation).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from setuptools import find_packages, setup  # noqa: E402

# Hugging Face's `kernels` (a dependency of transformers) and AdapterHub's `adapters` install
# top-level packages named as two of ours. A wheel of this project never writes a file there: our
# `kernels` and `adapters` go under _vit_forget_not/, where engine finds them (engine/own_packages.py).
WHEEL_HOME = "_vit_forget_not"
TOP_LEVEL = find_packages(include=["engine", "engine.*", "bench", "bench.*"])
OWN = find_packages(include=["kernels", "kernels.*", "adapters", "adapters.*"])

setup(
    name="vit-forget-not",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=[*TOP_LEVEL, *(f"{WHEEL_HOME}.{p}" for p in OWN)],
    package_dir={f"{WHEEL_HOME}.{p}": p.replace(".", "/") for p in OWN},
    package_data={"engine": ["assets/*.safetensors", "assets/*.json", "assets/*.txt"]},
    install_requires=[
        "torch>=2.4,<2.16",
        "torchvision>=0.19,<0.31",
        "timm>=1.0.9,<1.1",
        "triton>=3.0,<3.10; platform_system == 'Linux'",
        "deepspeed>=0.16,<0.20",
        "nvidia-dali-cuda130>=2.0,<3; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "scikit-learn>=1.3,<2",
        "safetensors>=0.4,<1",
        "pyyaml>=6,<7",
        "numpy>=1.24,<3",
        "pillow>=10,<14",
        "tqdm>=4.66,<5",
        "matplotlib>=3.7,<4",          # forgetting.png, the sweep's figures
        "scipy>=1.5,<2",               # the sweep report's t intervals (scikit-learn needs it too)
    ],
    extras_require={
        # pytest-timeout: a test that hangs fails with every thread's stack instead of stalling CI;
        # pytest-xdist: the suite on two worker processes (pytest.ini), a test file each at a time
        "test": ["pytest>=8,<10", "pytest-benchmark>=4,<6", "pytest-timeout>=2.3,<3", "pytest-xdist>=3.5,<4",
                 "peft>=0.13,<1",
                 "submitit>=1.5,<2", "open_clip_torch>=3.0,<4"],
        "cluster": ["submitit>=1.5,<2"],  # python -m engine.sweep --launcher submitit (SLURM)
        "clip": ["open_clip_torch>=3.0,<4"],  # CLIP's text tower: eval.zeroshot, model.head_init=zeroshot
    },
)
