"""The README's commands work as written.

Every `dynbert train` line composes (`--cfg`: the overrides parse, every key exists, every value is
valid) and every `dynbert sweep` line plans (`--dry-run`: each run's config is checked); the other
commands' options exist. Running them all would take hours; what broke for users before was a
command that did not parse (`task.data_dir=~/glue/SST-2`) or named a key no config had.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dynbert.sweep import plan_sweep
from helpers import invoke

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHARED = ROOT.parent / "shared" / "data"


def readme_command_lines() -> list[str]:
    """`dynbert ...` lines of the README's bash blocks, comments cut, `...` placeholders left out."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("dynbert ") and "..." not in line and "<" not in line:
                lines.append(line)
    return lines


def commands(name: str) -> list[str]:
    return [line for line in readme_command_lines() if shlex.split(line)[1] == name]


def test_the_readme_has_the_commands_this_file_checks():
    assert len(commands("train")) >= 5 and len(commands("sweep")) >= 3
    named = {shlex.split(line)[1] for line in readme_command_lines()}
    assert {"report", "bench", "inspect", "predict", "export"} <= named


@pytest.mark.parametrize("line", commands("train"))
def test_every_readme_train_line_composes(line):
    args = shlex.split(line)[1:]
    if any("../shared" in arg for arg in args) and not SHARED.is_dir():
        pytest.skip(f"{line} reads {SHARED}, absent here")
    result = invoke(*args, "--cfg")
    assert result.exit_code == 0, f"{line}\n{result.output}"


@pytest.mark.parametrize("line", commands("sweep"))
def test_every_readme_sweep_line_plans(line):
    # plan_sweep composes each swept value (what `--dry-run` checks before listing every job's
    # folder, which would compose all of the README's ~150 jobs).
    plan_sweep(shlex.split(line)[2:])


@pytest.mark.parametrize("line", [line for name in ("report", "bench", "inspect", "predict", "export")
                                  for line in commands(name)])
def test_every_option_of_the_other_readme_lines_exists(line):
    args = shlex.split(line)
    help_text = invoke(args[1], "--help").output
    for option in (arg for arg in args[2:] if arg.startswith("--")):
        assert re.search(rf"{re.escape(option)}\b", help_text), f"{line}: dynbert {args[1]} has no {option}"


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in README and ci.strip().splitlines()[-1] == "python3 -m pytest -q"
