"""kotune's messages to the user, one channel: printed by the first process only, hushed by ``kotune --quiet``.

``info`` goes to stdout, where a command reports what it did. ``status`` goes to stderr: progress that stands beside
a command's results on stdout (JSON, tables, generated rows) or beside the training progress bar. Both go through
``tqdm.write``, so a line never tears an open bar. ``warn`` and ``error`` always print, on stderr; a command's
results themselves (``--dry-run``'s YAML, ``data preview``, ``eval``'s table, chat) are printed by the command.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """``--quiet``: drop ``info`` and ``status`` messages; warnings and errors still print."""
    global _quiet
    _quiet = quiet


def _first_process() -> bool:
    # torchrun and accelerate set RANK; reading it here keeps this module free of torch
    return int(os.environ.get("RANK", 0)) == 0


def info(text: str) -> None:
    """What a command did, on stdout."""
    if _first_process() and not _quiet:
        tqdm.write(text, file=sys.stdout)


def status(text: str) -> None:
    """Progress beside a command's results or the training bar, on stderr."""
    if _first_process() and not _quiet:
        tqdm.write(text, file=sys.stderr)


def warn(text: str) -> None:
    """Something the user should know although the command goes on, on stderr."""
    if _first_process():
        tqdm.write(f"kotune: warning: {text}", file=sys.stderr)


def error(text: str, every_process: bool = True) -> None:
    """The one line a failed command ends with, on stderr; every process prints its own, unless the error is one
    each process meets alike (``every_process=False``: ``KotuneError.refusal``), which the first one says."""
    if every_process or _first_process():
        print(f"kotune: error: {text}", file=sys.stderr)
