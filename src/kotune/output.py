"""kotune's messages to the user, one channel: printed by the first process only, hushed by ``kotune --quiet``.

``info`` goes to stdout, where a command reports what it did. ``status`` goes to stderr: progress that stands beside
a command's results on stdout (JSON, tables, generated rows) or beside the training progress bar. Both go through
``tqdm.write``, so a line never tears an open bar. ``warn`` and ``error`` always print, on stderr; a command's
results themselves (``--dry-run``'s YAML, ``data preview``, ``eval``'s table, chat) are printed by the command.
"""

from __future__ import annotations

import os
import sys
import time

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
        # one write, newline included: print's two (text, then end) let two processes' lines run together in a log
        sys.stderr.write(f"kotune: error: {text}\n")
        sys.stderr.flush()


class LineProgress:
    """The training progress for a log, not a terminal: one plain ``status`` line every ``every`` steps (and at the
    last), where a tqdm bar would write a carriage-return redraw per step into a scheduler log or nohup.out.

    Takes what the loop gives a tqdm bar (``set_postfix``, ``update``, ``close``).
    """

    def __init__(self, total: int, done: int, every: int, desc: str = "train"):
        self.total, self.n, self.every, self.desc = total, done, max(1, every), desc
        self.start_n, self.start_time, self.postfix = done, time.monotonic(), {}

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            status(self.line())

    def line(self) -> str:
        """``train: step 40/200 (20%), loss=1.2345, input_tok_s=2030, trained_tok_s=812, 1.50 s/step, 4m00s left``."""
        parts = [f"{self.desc}: step {self.n}/{self.total} ({100 * self.n // max(1, self.total)}%)"]
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        seconds = (time.monotonic() - self.start_time) / max(1, self.n - self.start_n)
        parts += [f"{seconds:.2f} s/step", f"{tqdm.format_interval(seconds * (self.total - self.n))} left"]
        return ", ".join(parts)

    def close(self) -> None:
        """Nothing to clear: every line is already whole."""
