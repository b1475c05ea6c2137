"""`python -m engine.export RUN_DIR --merged OUT.safetensors`: a fine-tuned model that timm alone can load.

Rebuilds the run's base backbone (from its config.yaml), loads the run's adapter onto it, finalises it
(LoRA merged into the frozen weights, inactive selective-LoRA blocks dropped, expanded blocks kept as
ordinary blocks) and writes a plain timm state dict. Next to it, OUT.json holds the timm model name and
the kwargs that rebuild the architecture (depth includes any expanded blocks; num_classes the head);
the same two entries are in the safetensors metadata. Loading it needs nothing from this project:

    spec = json.load(open("OUT.json"))
    model = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("OUT.safetensors"))
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch import nn

from .adapter_files import CONFIG
from .config import build_config
from .errors import UserError
from .io import atomic_write_json, atomic_write_safetensors
from .models import restore_model, timm_spec


def write_merged(model: nn.Module, out: str | Path, strategy_name: str) -> dict:
    """Write `model`'s state dict to `out` and its timm spec to `out` with a .json suffix; return the spec.

    The spec comes from the model itself (`timm_spec`), so expanded blocks and the new head are
    always described correctly.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--merged must name a .safetensors file, got {out}")
    spec = timm_spec(model)
    sidecar = {"name": spec["name"], "kwargs": spec["kwargs"], "strategy": strategy_name}
    metadata = {"timm_model": spec["name"], "timm_kwargs": json.dumps(spec["kwargs"]), "strategy": strategy_name}
    atomic_write_safetensors(out, model.state_dict(), metadata=metadata)
    atomic_write_json(out.with_suffix(".json"), sidecar)
    return sidecar


def export_run(run_dir: str | Path, out: str | Path) -> dict:
    """Export the run folder's adapter (its best checkpoint) merged into its base model; return the spec."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{run_dir} is not a run folder: it has no config.yaml (written by python -m engine.run)")
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} has no adapter (adapter/adapter.json): the run did not finish; "
                        f"its checkpoints/ folder may hold one to export instead")
    model, strategy = restore_model(build_config(config), adapter_dir)
    return write_merged(strategy.finalize(model).eval(), out, strategy.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (runs/<name>) holding config.yaml and adapter/")
    p.add_argument("--merged", metavar="OUT.safetensors", required=True,
                   help="where to write the merged timm state dict (OUT.json is written beside it)")
    args = p.parse_args(argv)
    try:
        spec = export_run(args.run_dir, args.merged)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.merged} ({spec['strategy']} merged): timm.create_model({spec['name']!r}, "
          f"pretrained=False, **{Path(args.merged).with_suffix('.json')}['kwargs'])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
