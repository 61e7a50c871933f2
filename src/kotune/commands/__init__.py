"""Subcommands of the ``kotune`` CLI; each module has ``register(subparsers)``."""
