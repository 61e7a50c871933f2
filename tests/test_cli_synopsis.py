"""The README's command synopsis and the argparse help say the same: every option of every subcommand is in the
synopsis (with its choices), and the synopsis names no option the command lacks."""

from __future__ import annotations

import argparse
import re

import pytest
from conftest import ROOT

from kotune.cli import build_parser


def subcommands(parser: argparse.ArgumentParser, path: str = "") -> dict[str, argparse.ArgumentParser]:
    """``"merge"``, ``"data audit"``... -> their parsers (the leaves: commands that run)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= subcommands(sub, f"{path} {name}".strip())
    return found or {path: parser}


def synopsis() -> dict[str, str]:
    """The README's first code block, one entry per ``kotune ...`` line with the indented lines under it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```\n(kotune .*?)```", text, re.S).group(1)
    entries = re.split(r"\n(?=kotune )", block.strip())
    return {" ".join(e.split()[1:3]) if e.startswith("kotune data") else e.split()[1]: e for e in entries}


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", sorted(subcommands(build_parser())))
def test_every_option_is_in_the_readme_synopsis(command):
    parser = subcommands(build_parser())[command]
    entries = synopsis()
    assert command in entries, f"the README synopsis has no line for `kotune {command}`"
    entry = entries[command]
    for action in options(parser):
        flag = action.option_strings[-1]
        assert re.search(rf"{flag}\b", entry), f"`kotune {command}` has {flag}; the README synopsis lacks it"
        if action.choices:
            assert f"{flag} {'|'.join(action.choices)}" in entry, f"{flag}'s choices differ in the README synopsis"
    known = {s for a in options(parser) for s in a.option_strings}
    stale = set(re.findall(r"--[a-z][a-z-]*", entry)) - known
    assert not stale, f"the synopsis of `kotune {command}` names options it lacks: {sorted(stale)}"
