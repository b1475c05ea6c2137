"""Loader throughput, side by side in one process, and the data wait of the default run's train loop.

    python -m bench.loaders            # 2,000 JPEGs, 5 interleaved rounds, 40 train steps (a few minutes)
    python -m bench.loaders --quick    # 1,000 JPEGs, 3 rounds, 12 train steps (about a minute; prints only)

Three sections, two tables and `bench/results/loaders-<device>.{csv,json}` (a full run writes them;
--quick only with --save or --out):

- files: a generated ImageFolder of JPEGs around 500 x 375 (cached under the temp folder), read at
  224 px (crop_pct 0.875, bicubic) by DALI on the CPU (the engine's way: DALI decodes, torch
  resamples; and with DALI's own resampler), the torch DataLoader with PIL (the engine's torch
  path) and a torch DataLoader that decodes with torchvision.io and transforms uint8 tensors;
  DALI `mixed` too on a GPU. Same thread / worker count for all. Train = random-resized
  crop + flip, eval = resize + centre crop.
- arrays: the embedded default's 32 x 32 in-memory images (digits), DALI external source vs torch.
- train wait: the fraction of each training step spent in `next(loader)` for the default run's
  loader and model (forward + backward + SGD on the embedded ViT, batch 64).

Throughput is steady state: each measured pass excludes its first 3 batches (start-up, prefetch), and
the configurations take turns, round after round, so a busy machine slows them all alike; the
table gives the median of the rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .report import add_output_options, format_table, parse_args, save_or_skip

IMAGENET = dict(input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875)
COLUMNS = ("section", "loader", "mode", "threads", "batch_size", "images", "img_per_s", "vs_best_torch",
           "cpu_ms_per_img", "wait_fraction", "step_ms", "note")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loaders", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1000 images, 3 rounds, 12 train steps")
    p.add_argument("--images", type=int, help="JPEGs to generate (default 2000, quick 1000)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per configuration (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers (default 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, help="train steps per loader for the data-wait harness (default 40, quick 12)")
    p.add_argument("--data", help="an existing ImageFolder to read instead of generated JPEGs")
    p.add_argument("--sections", default="files,arrays,wait", help="comma list of files, arrays, wait")
    add_output_options(p, quick=True)
    args = parse_args(p, argv)
    n_images = args.images or (1000 if args.quick else 2000)
    rounds = args.rounds or (3 if args.quick else 5)
    steps = args.steps or (12 if args.quick else 40)
    sections = args.sections.split(",")

    rows: list[dict] = []
    if "files" in sections:
        folder = Path(args.data) if args.data else generate_jpegs(n_images)
        rows += bench_files(folder, args.threads, args.batch_size, rounds)
    if "arrays" in sections:
        rows += bench_arrays(args.threads, args.batch_size, rounds)
    if "wait" in sections:
        rows += bench_train_wait(args.threads, args.batch_size, steps)

    print_tables(rows, args.markdown)
    save_or_skip(args, "loaders", rows, COLUMNS)
    return 0


# ----------------------------------------------------------------------------------------------
# Data


def generate_jpegs(n: int, classes: int = 10, seed: int = 0, root: Path | None = None) -> Path:
    """n photo-like JPEGs (smooth colour fields + grain) of 400-600 x 300-450 px, in class folders.

    Kept under the temp folder (or `root`) and reused when the same n was generated there before.
    """
    from PIL import Image

    root = root or Path(tempfile.gettempdir()) / f"engine-bench-loaders-{n}"
    done = root / ".complete"
    if done.exists():
        return root
    print(f"generating {n} JPEGs in {root} ...", flush=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    done.touch()
    return root


# ----------------------------------------------------------------------------------------------
# Throughput


def steady_rate(loader, skip: int = 3) -> tuple[float, float]:
    """(images per second, CPU ms per image) over one pass of `loader`, not counting its first
    `skip` batches (start-up, and batches prepared before the pass began: DALI prefetches two).

    CPU time counts this process's threads (DALI's among them) and its child processes (DataLoader
    workers): on a shared machine it moves less than wall time does.
    """
    it = iter(loader)
    for _ in range(skip):
        next(it)
    start, cpu, n = time.perf_counter(), _cpu_seconds(), 0
    for images, _ in it:
        n += len(images)
    return n / (time.perf_counter() - start), 1000 * (_cpu_seconds() - cpu) / n


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its live children (Linux /proc; elsewhere this process)."""
    total, me = time.process_time(), os.getpid()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid ... utime stime
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_rounds(configs: dict, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """configs: name -> loader. One warm-up pass each (workers, pipelines), then rounds in turn."""
    for loader in configs.values():
        steady_rate(loader)
    results = {name: [] for name in configs}
    for _ in range(rounds):
        for name, loader in configs.items():
            results[name].append(steady_rate(loader))
    return results


def bench_files(folder: Path, threads: int, batch_size: int, rounds: int) -> list[dict]:
    from engine.data import Preprocess, Split, load_domain, make_loader

    domain = load_domain(f"imagefolder:{folder}")
    split = Split(labels=np.concatenate([domain.train.labels, domain.test.labels]),
                  paths=domain.train.paths + domain.test.paths)
    pre = Preprocess(**IMAGENET)
    rows = []
    for mode in ("train", "eval"):
        train = mode == "train"
        common = dict(train=train, batch_size=batch_size, workers=threads)
        configs = {
            "dali-cpu": make_loader(split, pre, loader="dali", **common),
            "dali-cpu-dali-resize": make_loader(split, pre, loader="dali", dali_resize="dali", **common),
            "torch-pil": make_loader(split, pre, loader="torch", **common),
            "torch-tvio": tvio_loader(split, pre, train, batch_size, threads),
        }
        if torch.cuda.is_available():
            configs["dali-mixed"] = make_loader(split, pre, loader="dali", device="cuda", **common)
        print(f"files/{mode}: {len(split)} images, {rounds} rounds ...", flush=True)
        rates = run_rounds(configs, rounds)
        rows += _rate_rows("files", mode, rates, threads, batch_size, len(split))
        del configs
    return rows


def tvio_loader(split, pre, train: bool, batch_size: int, workers: int):
    """A torch DataLoader that decodes with torchvision.io and transforms uint8 tensors (v2)."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms import InterpolationMode, v2

    bicubic = InterpolationMode.BICUBIC
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    if train:
        transform = v2.Compose([v2.RandomResizedCrop(pre.input_size, scale=pre.train_scale, interpolation=bicubic,
                                                     antialias=True), v2.RandomHorizontalFlip(), *tail])
    else:
        transform = v2.Compose([v2.Resize(pre.resize_size, interpolation=bicubic, antialias=True),
                                v2.CenterCrop(pre.input_size), *tail])

    class TvioDataset(Dataset):
        def __len__(self):
            return len(split)

        def __getitem__(self, i):
            image = decode_image(read_file(split.paths[i]), mode=ImageReadMode.RGB)  # (3, H, W) uint8
            return transform(image), int(split.labels[i])

    return DataLoader(TvioDataset(), batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                      persistent_workers=workers > 0)


def bench_arrays(threads: int, batch_size: int, rounds: int) -> list[dict]:
    """The embedded default's data: 32 x 32 uint8 arrays, read at 32 px (crop_pct 1.0)."""
    from engine.data import Preprocess, make_loader
    from engine.data.datasets import digits_domain

    split = digits_domain().train
    pre = Preprocess(input_size=32, mean=(0.5,) * 3, std=(0.3,) * 3, crop_pct=1.0)
    rows = []
    for mode in ("train", "eval"):
        common = dict(train=mode == "train", batch_size=batch_size)
        started = {}
        configs = {}
        for name, loader, workers in (("dali-cpu", "dali", threads), ("torch-pil", "torch", threads),
                                      ("torch-pil-w0", "torch", 0)):
            t = time.perf_counter()
            configs[name] = make_loader(split, pre, loader=loader, workers=workers, **common)
            next(iter(configs[name]))  # build / spawn, then the first batch
            started[name] = time.perf_counter() - t
        print(f"arrays/{mode}: {len(split)} images, {rounds * 3} rounds ...", flush=True)
        rates = run_rounds(configs, rounds * 3)
        for row in _rate_rows("arrays", mode, rates, threads, batch_size, len(split)):
            row["note"] = f"first batch {started[row['loader']]:.2f} s after make_loader" + \
                ("; workers=0" if row["loader"].endswith("w0") else "")
            rows.append(row)
    return rows


def _rate_rows(section: str, mode: str, results: dict[str, list[tuple[float, float]]], threads: int,
               batch_size: int, images: int) -> list[dict]:
    rates = {name: statistics.median(r for r, _ in runs) for name, runs in results.items()}
    best_torch = max(v for k, v in rates.items() if k.startswith("torch"))
    return [dict(section=section, loader=name, mode=mode, threads=threads, batch_size=batch_size, images=images,
                 img_per_s=round(rate), vs_best_torch=round(rate / best_torch, 2),
                 cpu_ms_per_img=round(statistics.median(c for _, c in results[name]), 2),
                 note="img/s by round: " + " ".join(f"{r:.0f}" for r, _ in results[name]))
            for name, rate in rates.items()]


# ----------------------------------------------------------------------------------------------
# Data wait in the train loop


def bench_train_wait(threads: int, batch_size: int, steps: int) -> list[dict]:
    """Fraction of each train step spent waiting in next(loader), default run's data and model."""
    from engine.data import Preprocess, make_loader, resolve_loader
    from engine.data.datasets import digits_domain
    from engine.models import features

    model, note = _default_model()
    pre = Preprocess.from_model(model)
    head = torch.nn.Linear(model.num_features, 10)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    split = digits_domain().train
    auto = resolve_loader("auto")

    def train_step(images, labels):
        logits = head(features(model, images))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    names = ("dali", "torch")
    batches = {name: _endless(make_loader(split, pre, train=True, batch_size=batch_size, loader=name,
                                          workers=threads)) for name in names}
    for name in names:  # start-up: pipeline build, worker spawn, first batches
        for _ in range(3):
            train_step(*next(batches[name]))
    wait = {name: 0.0 for name in names}
    total = dict(wait)
    block = max(1, steps // 4)
    print(f"train wait: {steps} steps per loader, in turns of {block} ...", flush=True)
    for _ in range(0, steps, block):  # the loaders take turns, so a busy machine slows both alike
        for name in names:
            for _ in range(block):
                t0 = time.perf_counter()
                images, labels = next(batches[name])
                t1 = time.perf_counter()
                train_step(images, labels)
                wait[name] += t1 - t0
                total[name] += time.perf_counter() - t0
    n = len(range(0, steps, block)) * block
    return [dict(section="train-wait", loader=name + (" (= auto)" if name == auto else ""), mode="train",
                 threads=threads, batch_size=batch_size, images=len(split),
                 wait_fraction=round(wait[name] / total[name], 4),
                 step_ms=round(1000 * total[name] / n, 1), note=note) for name in names]


def _default_model():
    """The embedded default backbone (random weights suffice for timing)."""
    from engine.config import ModelConfig
    from engine.models import build_backbone

    return build_backbone(ModelConfig(pretrained=False)).train(), "embedded ViT (random init)"


def _endless(loader):
    while True:
        yield from loader


def print_tables(rows: list[dict], markdown: bool = False) -> None:
    """Throughput (files, arrays) and the train loop's data wait, one table each."""
    throughput = [r for r in rows if r["section"] != "train-wait"]
    if throughput:
        print()
        print(format_table(throughput, ("section", "mode", "loader", "threads", "img_per_s", "vs_best_torch",
                                        "cpu_ms_per_img", "note"),
                           labels={"threads": "thr", "img_per_s": "img/s", "vs_best_torch": "vs best torch",
                                   "cpu_ms_per_img": "cpu ms/img"},
                           formats={"vs_best_torch": ".2f", "cpu_ms_per_img": ".2f"}, markdown=markdown))
    waits = [r for r in rows if r["section"] == "train-wait"]
    if waits:
        print()
        print(format_table(waits, ("loader", "step_ms", "wait_fraction", "note"),
                           labels={"loader": "train loop (default run)", "step_ms": "step ms",
                                   "wait_fraction": "data wait", "note": "model"},
                           formats={"step_ms": ".1f", "wait_fraction": ".2%"}, markdown=markdown))

if __name__ == "__main__":
    raise SystemExit(main())
