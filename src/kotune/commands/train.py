"""``kotune train CONFIG.yaml [key=value ...]``"""

from __future__ import annotations

import shlex
import sys

from kotune.config import load_config
from kotune.report import check_loggers


def add_config_arguments(parser) -> None:
    """CONFIG and ``key=value`` overrides, shared by every command that reads a config."""
    parser.add_argument("config", help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override, e.g. train.learning_rate=1e-4")


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with QLoRA and write an adapter")
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the fully resolved config and exit")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|PATH",
        help="continue from the newest complete checkpoint (auto) or a given one",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: continue even if the data, tokenizer, template or training config changed",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    check_loggers(cfg)
    if args.dry_run:
        from kotune.security import redact

        print(redact(cfg.to_yaml()), end="")
        return 0
    from kotune.recipe import OutOfMemory, train
    from kotune.signals import Interrupted
    from kotune.train import NonFiniteLoss

    try:
        train(cfg, resume=args.resume, force=args.force)
    except Interrupted as stop:
        print(f"kotune: {stop}\nkotune: to continue, run: {resume_command(args)}", file=sys.stderr)
        return stop.exit_code
    except (NonFiniteLoss, OutOfMemory) as exc:
        print(f"kotune: error: {exc}", file=sys.stderr)
        return 1
    return 0


def resume_command(args) -> str:
    """The command line that continues this run (tokens, if any were typed, redacted)."""
    from kotune.security import redact

    return redact(shlex.join(["kotune", "train", args.config, *args.overrides, "--resume"]))
