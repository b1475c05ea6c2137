"""Kernel-optimised fine-tuning of pre-trained ViTs without catastrophic forgetting."""
from setuptools import find_packages, setup

setup(
    name="vit-forget-not",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "adapters", "adapters.*", "kernels", "kernels.*",
                                    "bench", "bench.*"]),
    package_data={"engine": ["assets/*.safetensors", "assets/*.json"]},
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
    ],
    extras_require={
        # pytest-timeout: a test that hangs fails with every thread's stack instead of stalling CI
        "test": ["pytest>=8,<10", "pytest-benchmark>=4,<6", "pytest-timeout>=2.3,<3", "peft>=0.13,<1",
                 "submitit>=1.5,<2"],
        "cluster": ["submitit>=1.5,<2"],  # python -m engine.sweep --launcher submitit (SLURM)
    },
)
