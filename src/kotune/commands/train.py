"""``kotune train CONFIG.yaml [key=value ...]``"""

from __future__ import annotations

from kotune.config import load_config


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
    p.set_defaults(run=run)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    from kotune.recipe import train

    train(cfg, resume=args.resume)
    return 0
