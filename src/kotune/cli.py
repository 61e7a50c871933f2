"""The ``kotune`` command: one subcommand per job, each defined in ``kotune.commands.<name>``."""

from __future__ import annotations

import argparse
import importlib
import sys

from kotune import __version__

COMMANDS = ("train", "data", "merge", "chat", "generate", "push")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kotune", description="QLoRA fine-tuning of LLMs on instruction data.")
    parser.add_argument("--version", action="version", version=f"kotune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"kotune.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kotune.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as exc:
        print(f"kotune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
