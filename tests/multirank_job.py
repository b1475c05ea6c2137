"""`torchrun --nproc_per_node 2 -m tests.multirank_job OUT NAME ARGS... [-- NAME ARGS...]`: several
`engine.run` runs in the same two processes (one launch instead of one per run)."""
import sys

from engine.run import main

if __name__ == "__main__":
    out, runs = sys.argv[1], " ".join(sys.argv[2:]).split(" -- ")
    for run in runs:
        name, *args = run.split()
        code = main([*args, "--out", out, "--name", name])
        if code:
            sys.exit(code)
