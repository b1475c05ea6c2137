"""Every `engine.run` command in README.md is accepted by `--dry-run`: the start checks a real start
runs (strategy options, batch geometry on the command's world, the optimiser against the ZeRO stage
that runs there), on a meta-device model, with no data or weights read. torchrun and deepspeed
launches are checked for their world (`--nproc_per_node` x `--nnodes`, `--num_gpus` x
`--num_nodes`) through `--world-size`. A command that cannot be dry-run is listed in `NOT_DRY_RUN`
with the reason, so that a new one is a decision, not an accident."""
import re
import shlex
from pathlib import Path

import pytest

from engine.run import main  # first: `adapters` is this project's from here on
import adapters  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
LAUNCHER = re.compile(r"(?:python3? -m engine\.run|torchrun\s[^`]*?-m engine\.run"
                      r"|deepspeed\s[^`]*?--module engine\.run)(?=\s|$)")
# Commands (their arguments after the launcher) the README shows that no dry run can take, and why.
NOT_DRY_RUN = {
    "--resume runs/vit-lora-1": "continues an existing run folder (tests/test_resume.py resumes real runs)",
    "--resume RUN_DIR": "a placeholder run folder, and --resume continues an existing one",
    "--deepspeed-config ds.json ...": "`...` stands for the rest of a command; ds.json is the user's own file",
    "...": "`...` stands for any command",
}
# Placeholders that stand for each strategy: such a command is checked once per strategy.
STRATEGY_PLACEHOLDERS = ("NAME", "S")


def _candidates(text: str):
    """Lines of fenced code blocks (backslash continuations joined) and inline code spans of the prose."""
    for i, part in enumerate(re.split(r"^```[^\n]*\n", text, flags=re.M)):
        if i % 2:
            yield from part.replace("\\\n", " ").splitlines()
        else:
            yield from (span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", part))


def readme_commands() -> list[tuple[int, list[str]]]:
    """(world size, engine.run's arguments) of every engine.run command in README.md, in order."""
    found = []
    for candidate in _candidates(README.read_text()):
        for match in LAUNCHER.finditer(candidate):
            args = re.split(r"\s(?:&&|;|\||#)(?:\s|$)", candidate[match.end():])[0]
            found.append((_world(shlex.split(match.group(0))), args.split()))
    return found


def _world(launch: list[str]) -> int | None:
    """The ranks a launch starts: processes per node times nodes (None: a placeholder, `N`)."""
    options = {}
    for i, word in enumerate(launch):
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            options[name.replace("-", "_")] = value or (launch[i + 1] if i + 1 < len(launch) else "")
    per_node = options.get("nproc_per_node") or options.get("num_gpus") or "1"
    nodes = options.get("nnodes") or options.get("num_nodes") or "1"
    nodes = nodes.split(":")[-1]  # torchrun's elastic MIN:MAX: the most it may start
    return int(per_node) * int(nodes) if per_node.isdigit() and nodes.isdigit() else None


def _expanded(args: list[str]) -> list[list[str]]:
    """`--strategy NAME` (a placeholder) as one command per strategy; any other command as it is."""
    at = [i for i, word in enumerate(args) if word in STRATEGY_PLACEHOLDERS and i and args[i - 1] == "--strategy"]
    if not at:
        return [args]
    return [[name if i in at else word for i, word in enumerate(args)] for name in adapters.STRATEGIES]


COMMANDS = readme_commands()
CHECKED = [(world, expanded) for world, args in COMMANDS if " ".join(args) not in NOT_DRY_RUN
           for expanded in _expanded(args)]


def test_the_readme_shows_the_commands_this_test_expects():
    """The parse finds the launches (a broken parse would pass everything), and every command it
    skips is still in the README (a stale skip would hide nothing and should go)."""
    shown = {" ".join(args) for _, args in COMMANDS}
    assert set(NOT_DRY_RUN) <= shown, set(NOT_DRY_RUN) - shown
    worlds = {world for world, _ in CHECKED}
    assert None not in worlds, [args for world, args in CHECKED if world is None]
    assert {1, 8, 32} <= worlds and len(CHECKED) >= 8


@pytest.mark.parametrize("world, args", CHECKED, ids=[f"{w}:{' '.join(a)[:60]}" for w, a in CHECKED])
def test_every_readme_command_is_accepted_by_dry_run(world, args, capsys):
    code = main([*args, "--dry-run", "--world-size", str(world)]) if "--help" not in args else _help(args)
    err = capsys.readouterr().err.strip()
    assert code == 0, err.splitlines()[-1] if err else f"exit {code}"


def _help(args) -> int:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def test_the_worked_example_is_checked_on_its_32_ranks(capsys):
    """The README's global batch of 4,096 on 32 GPUs: LAMB, full fine-tuning, at the stage that runs it."""
    example = [args for world, args in CHECKED if world == 32 and "lamb" in args]
    assert len(example) == 1
    assert main([*example[0], "--dry-run", "--world-size", "32"]) == 0
    assert "global batch 4096 = micro-batch 128 x accumulation 1 x 32 rank(s)" in capsys.readouterr().out
