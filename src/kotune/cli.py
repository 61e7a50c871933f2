"""The ``kotune`` command: one subcommand per job, each defined in ``kotune.commands.<name>``."""

from __future__ import annotations

import argparse
import importlib
import sys

from kotune import __version__

COMMANDS = ("init", "train", "plan", "data", "merge", "chat", "generate", "eval", "report", "push", "export", "ui")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kotune", description="QLoRA fine-tuning of LLMs on instruction data.")
    parser.add_argument("--version", action="version", version=f"kotune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings, errors and results")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="read hub models and datasets from the local cache only, never the network",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"kotune.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kotune import output
    from kotune.errors import KotuneError
    from kotune.model.hub import go_offline
    from kotune.model.load import quiet_bitsandbytes
    from kotune.training.memory import growable_segments

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.offline:
        go_offline()  # before bitsandbytes or any hub library is imported: they read it once, at import
    quiet_bitsandbytes()
    growable_segments()
    # argparse stops filling a positional list at the first option: `train C.yaml --dry-run a=1` leaves
    # `a=1` over. Overrides may stand anywhere on the line, so collect them here.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    output.set_quiet(args.quiet)
    try:
        return args.run(args) or 0
    except KotuneError as exc:
        output.error(str(exc), every_process=not exc.refusal)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves a checkpoint first): one line, no traceback
        output.error(f"{args.command} interrupted (Ctrl-C)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
