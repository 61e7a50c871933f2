"""``kotune train CONFIG.yaml [key=value ...]``"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from kotune.config import ConfigError
from kotune.config_load import load_config
from kotune.training.report import check_loggers


def add_config_arguments(parser, optional: bool = False) -> None:
    """CONFIG and ``key=value`` overrides, shared by every command that reads a config.

    ``optional``: CONFIG may be missing from the positionals because an option took it (see ``config_and_resume``).
    """
    parser.add_argument("config", nargs="?" if optional else None, help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override, e.g. train.learning_rate=1e-4")


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with QLoRA and write an adapter")
    add_config_arguments(p, optional=True)
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
        help="with --resume: continue even if the data, tokenizer, template or training config changed; "
        "start although `kotune plan` predicts the run does not fit the GPU",
    )
    p.add_argument(
        "--fit",
        action="store_true",
        help="on a GPU: the largest train.micro_batch_size that fits it (rows per step unchanged; see kotune plan)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an output folder that holds one, moving the old run to OUTPUT_DIR.replaced-N",
    )
    p.set_defaults(run=run)


def config_and_resume(args) -> None:
    """Sort out what argparse gives ``--resume`` (it takes an optional value) when it is not a checkpoint.

    A checkpoint is a folder, so a file (or a ``.yaml`` name) after ``--resume`` is the config, and a ``key=value``
    an override; the resume is then auto.
    """
    if args.resume not in (None, "auto") and "=" in args.resume and not Path(args.resume).is_dir():
        args.overrides, args.resume = [args.resume, *args.overrides], "auto"  # `--resume train.max_steps=20`
    taken = args.resume not in (None, "auto") and (
        Path(args.resume).is_file() or Path(args.resume).suffix in (".yaml", ".yml")
    )
    if taken and args.config is not None and "=" not in args.config:
        raise ConfigError(
            f"two configs given ({args.resume} after --resume, and {args.config}); --resume takes a checkpoint "
            "folder or nothing: kotune train CONFIG.yaml [key=value ...] --resume [CHECKPOINT]"
        )
    if taken:
        args.overrides = [args.config, *args.overrides] if args.config is not None else args.overrides
        args.config, args.resume = args.resume, "auto"
    if args.config is None:
        raise ConfigError("no config given: kotune train CONFIG.yaml [key=value ...] [--resume [CHECKPOINT]]")
    if args.resume is not None and args.overwrite:
        raise ConfigError("--resume continues the run in the output folder and --overwrite moves it aside: pick one")


def run(args) -> int:
    config_and_resume(args)
    cfg = load_config(args.config, args.overrides)
    check_loggers(cfg)
    if args.dry_run:
        from kotune.security import redact

        print(redact(cfg.to_yaml()), end="")
        return 0
    from kotune.training.dist import is_main
    from kotune.training.recipe import train
    from kotune.training.signals import Interrupted

    try:
        train(cfg, resume=args.resume, force=args.force, overwrite=args.overwrite, fit_gpu=args.fit)
    except Interrupted as stop:
        if is_main():  # every process stopped at the same step; one message
            print(f"kotune: {stop}\nkotune: to continue, run: {resume_command(args)}", file=sys.stderr)
        return stop.exit_code
    return 0


def resume_command(args) -> str:
    """The command line that continues this run (tokens, if any were typed, redacted): under torchrun the launcher
    again with as many processes, or a resume on one process would take the run over alone."""
    import os

    from kotune.security import redact

    words = ["train", args.config, *args.overrides, "--resume"]
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return redact(shlex.join(["kotune", *words]))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = [f"--nnodes={world // local}"] if world > local else []
    launcher = ["torchrun", f"--nproc_per_node={local}", *nodes, "-m", "kotune.cli"]
    hint = " (on every node, with its rendezvous options)" if nodes else ""
    return redact(shlex.join([*launcher, *words])) + hint
