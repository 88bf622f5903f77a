"""The README's commands agree with the code: every `distillery ...` line of its shell blocks
parses with the CLI's own argument parser (a renamed flag or command fails here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipelines.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """`distillery` command lines of the README's ```bash blocks, continuations joined, comments cut."""
    commands, block, pending = [], False, ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):  # `distillery ...`, `.venv/bin/distillery ...`, `... --module pipelines.cli ...`
            if Path(word).name == "distillery" or (word == "pipelines.cli" and words[i - 1] in ("-m", "--module")):
                rest = words[i + 1:]
                cut = next((j for j, w in enumerate(rest) if w in ("&&", "|", ";", "&")), len(rest))
                commands.append(shlex.join(rest[:cut]))
                break
    return commands


def test_the_readme_shows_commands():
    assert len(readme_commands()) > 20


@pytest.mark.parametrize("command", readme_commands())
def test_each_readme_command_parses(command):
    argv = shlex.split(re.sub(r"<[^>]+>", "X", command).replace("[", "").replace("]", ""))  # [optional] parts
    build_parser().parse_args(argv)  # argparse exits (status 2) on an unknown command or flag
