"""`torchrun --nproc_per_node 2 -m tests.multirank_job OUT NAME ARGS... [-- NAME ARGS...]`: several
`engine.run` runs in the same two processes (one launch instead of one per run). The name
`zero3-checkpointing` (no args) runs tests/zero3_checkpointing.py's check instead, writing OUT/NAME.json."""
import sys
from pathlib import Path

from engine.run import main

if __name__ == "__main__":
    out, runs = sys.argv[1], " ".join(sys.argv[2:]).split(" -- ")
    for run in runs:
        name, *args = run.split()
        if name == "zero3-checkpointing":
            from tests.zero3_checkpointing import main as check
            check(str(Path(out) / f"{name}.json"))
            continue
        code = main([*args, "--out", out, "--name", name])
        if code:
            sys.exit(code)
