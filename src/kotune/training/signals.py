"""Stopping on SIGINT / SIGTERM without losing work.

While training, the first signal only raises a flag: the loop finishes the optimizer step in progress,
writes a checkpoint and raises ``Interrupted``, whose message says how to resume. A second signal exits at
once (exit status 128 + signal number); the checkpoints already on disk stay valid because each is written
atomically. ``kill -9`` cannot be caught: it loses the steps since the last checkpoint, nothing more.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint."""

    def __init__(self, signum: int | None, step: int, checkpoint: Path | None):
        # A process that got no signal itself stops because another one did: report it as SIGTERM.
        self.signum = signum if signum is not None else int(signal.SIGTERM)
        self.step, self.checkpoint = step, checkpoint
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written on this process"
        super().__init__(f"stopped by {signal.Signals(self.signum).name} after step {step}; {saved}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def _say(text: str) -> None:
    # os.write, not print: a handler may interrupt a print to the same stream, and re-entering it raises.
    os.write(2, f"\nkotune: {text}\n".encode())


class StopOnSignal:
    """Context manager: while active, SIGINT / SIGTERM set ``signum``; a second signal exits at once.

    Handlers can only be installed from the main thread; elsewhere this is a no-op and signals keep
    their default behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in HANDLED}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            _say(f"second signal ({name}): exiting now; the checkpoints already written are intact")
            os._exit(128 + signum)
        self.signum = signum
        _say(f"{name} received: finishing this step and saving a checkpoint (send it again to exit at once)")
