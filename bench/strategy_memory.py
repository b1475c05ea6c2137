"""Training memory per strategy on one forward + backward of a ViT-B-sized model, on the CPU.

    python -m bench.strategy_memory                         # ViT-B/16, batch 8, six configurations
    python -m bench.strategy_memory --batch 4 --only full,block_expansion_p3

Each configuration runs in its own process. Two figures per configuration:
- saved activations: bytes of the tensors autograd keeps for backward (unique storages, parameters
  excluded), counted exactly with `torch.autograd.graph.saved_tensors_hooks`; and which blocks keep any.
- peak RSS: the process's peak resident set during forward + backward, above its size just before
  (Linux: the peak is reset through /proc/self/clear_refs first); includes gradients and temporaries.
Output: a table with ratios to `full`, and bench/results/strategy-memory-<device>.{csv,json}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .report import add_output_options, format_table, parse_args, save_or_skip

CONFIGS = {  # label -> (strategy, AdapterConfig options)
    "full": ("full", {}),
    "top_k_3": ("top_k", {"top_k": 3}),
    "block_expansion_p1": ("block_expansion", {"blocks": 1}),
    "block_expansion_p3": ("block_expansion", {"blocks": 3}),
    "lora_r8": ("lora", {"lora_rank": 8}),
    "linear": ("linear", {}),
}


def measure(label: str, model_name: str, batch: int, num_classes: int) -> dict:
    """One configuration, in this process: build, apply, then one measured forward + backward."""
    import timm
    import torch

    import adapters
    from adapters import AdapterConfig

    from .step_measures import rss_kib

    torch.manual_seed(0)
    strategy_name, options = CONFIGS[label]
    strategy = adapters.get_strategy(strategy_name, AdapterConfig(**options))
    model = strategy.apply(timm.create_model(model_name, pretrained=False, num_classes=0), num_classes).train()
    x = torch.randn(batch, 3, *model.patch_embed.img_size)
    y = torch.randint(0, num_classes, (batch,))
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    saved = {"bytes": 0, "blocks": set()}
    current = {"block": None}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__("block", i))
        block.register_forward_hook(lambda m, a, out: current.__setitem__("block", None))

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen.add(ptr)
            saved["bytes"] += storage.nbytes()
            if current["block"] is not None:
                saved["blocks"].add(current["block"])
        return t

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = rss_kib("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    peak = rss_kib("VmHWM")
    blocks = sorted(saved["blocks"])
    return {"config": label, "model": model_name, "batch": batch,
            "trainable_params": adapters.trainable_parameter_count(model),
            "saved_activations_mb": round(saved["bytes"] / 2**20, 1),
            "peak_rss_delta_mb": round((peak - before) / 1024, 1),
            "blocks_keeping_activations": f"{blocks[0]}-{blocks[-1]} of {len(model.blocks)}" if blocks else "none"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.strategy_memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    add_output_options(p)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure one configuration, print JSON
    args = parse_args(p, argv)
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.batch, args.num_classes)))
        return 0
    labels = args.only.split(",")
    unknown = [label for label in labels if label not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    rows = []
    for label in labels:
        cmd = [sys.executable, "-m", "bench.strategy_memory", "--one", label, "--model", args.model,
               "--batch", str(args.batch), "--num-classes", str(args.num_classes)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{label}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if not rows:
        return 1
    full = next((r for r in rows if r["config"] == "full"), None)
    for r in rows:
        for key in ("saved_activations_mb", "peak_rss_delta_mb"):
            r[key.replace("_mb", "_vs_full")] = round(r[key] / full[key], 3) if full and full[key] else None
    cols = ["config", "trainable_params", "saved_activations_mb", "saved_activations_vs_full",
            "peak_rss_delta_mb", "peak_rss_delta_vs_full", "blocks_keeping_activations"]
    print()
    print(format_table(rows, cols, markdown=args.markdown))
    save_or_skip(args, "strategy-memory", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
