"""The SIGKILL test, repeated: kill a run at a random step after its first full checkpoint, resume
it, and count how often the resumed run's results.json and metrics.csv equal an uninterrupted run's.

    python -m bench.kill_resume                     # 5 kills, 1 rank, the default loader (DALI here)
    python -m bench.kill_resume --ranks 2 --repeats 3 -- --loader torch

Every run is a real process (torchrun for several ranks); the kill goes to the whole process tree
after metrics.csv shows the chosen step, so it lands wherever the run is by then: in a step, an
evaluation or a checkpoint write. Prints one line per try and `matched N of M`, and writes the
tries to `bench/results/kill-resume-<device>[-Nranks].{csv,json}` (or `--out PATH`); the runs
themselves go to `--runs DIR`.
"""
from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import time
from pathlib import Path

from .processes import finish, metric_rows, results, signal_tree, start, wait_for_row
from .report import add_output_options, format_table, parse_args, save_or_skip

# The embedded default, shortened: selective LoRA in budget mode (gates fixed at step 6 of 12),
# a full checkpoint every 2 steps and a metrics row every step.
RUN = ["--strategy", "selective_lora", "--active-blocks", "4", "--steps", "12", "--eval-every", "4",
       "--checkpoint-every", "2", "--batch-size", "16", "train.log_every=1", "data.knn_train_limit=300",
       "data.knn_test_limit=100", "data.workers=0"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kill_resume", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--runs", default="runs/bench-kill-resume", help="folder for the runs (emptied first)")
    p.add_argument("--seed", type=int, default=None, help="seed of the kill steps (default: random)")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: more options for engine.run")
    add_output_options(p)
    args = parse_args(p, argv)
    run = RUN + [a for a in args.run_args if a != "--"]
    out = Path(args.runs)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps = int(run[run.index("--steps") + 1])
    first_checkpoint = int(run[run.index("--checkpoint-every") + 1])
    rng = random.Random(args.seed)

    began = time.perf_counter()
    if finish([*run, "--out", str(out), "--name", "uninterrupted"], args.ranks, out / "uninterrupted.log"):
        print(f"the uninterrupted run failed: see {out / 'uninterrupted.log'}", file=sys.stderr)
        return 1
    reference = (results(out / "uninterrupted"), metric_rows(out / "uninterrupted"))
    tries = []
    for i in range(args.repeats):
        step = rng.randint(first_checkpoint + 1, steps - 1)
        name = f"killed-{i}"
        proc = start([*run, "--out", str(out), "--name", name], args.ranks, out / f"{name}.log")
        wait_for_row(proc, out / name / "metrics.csv", step)
        signal_tree(proc, signal.SIGKILL)
        last_row = metric_rows(out / name)[-1]["step"]
        code = finish(["--resume", str(out / name)], args.ranks, out / f"{name}-resumed.log")
        same = code == 0 and (results(out / name), metric_rows(out / name)) == reference
        tries.append({"try": i + 1, "kill_after_step": step, "last_row_step": last_row, "resume_exit": code,
                      "match": same})
        print(f"try {i + 1}: SIGKILL once step {step} was logged (last row: step {last_row}), "
              f"resume exit {code}: {'match' if same else 'DIFFERENT'}", flush=True)
    matched = sum(t["match"] for t in tries)
    print()
    print(format_table(tries, tries[0].keys() if tries else ["try"], markdown=args.markdown))
    print(f"\nmatched {matched} of {args.repeats} ({args.ranks} rank(s), {time.perf_counter() - began:.0f} s)")
    save_or_skip(args, "kill-resume", tries, tag="" if args.ranks == 1 else f"-{args.ranks}ranks",
                 meta={"ranks": args.ranks, "matched": matched, "repeats": args.repeats, "run": run})
    return 0 if matched == args.repeats else 1


if __name__ == "__main__":
    sys.exit(main())
