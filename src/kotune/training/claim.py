"""Who may write a run folder: one process at a time (a lock), and a new run never over an old one.

``kotune train`` claims ``train.output_dir`` before anything loads: it must be a writable folder, no other
process may be training into it (an exclusive ``fcntl.flock`` on ``.kotune-lock``, which the kernel releases
when the process ends, crash or ``kill -9`` included), and a folder that already holds a run (anything kotune
writes there) is only continued with ``--resume`` or moved aside with ``--overwrite``. Under torchrun rank 0
takes the lock for all ranks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from kotune.errors import KotuneError
from kotune.run_folder import (
    ADAPTER,
    ADAPTER_CONFIG,
    BEST,
    CHECKPOINT_PREFIX,
    CONFIG,
    LOCK,
    METRICS,
    SUMMARY,
)
from kotune.security import SecurityError, refuse_escaping_links
from kotune.training import dist

RUN_FILES = (ADAPTER, ADAPTER_CONFIG, CONFIG, METRICS, SUMMARY, BEST)
"""What a run writes besides its ``checkpoint-N`` folders: any of them means the folder holds a run."""


class RunFolderError(KotuneError, RuntimeError):
    """The output folder cannot be used for this run; the message names it and what to do."""

    refusal = True


def run_files(folder: Path) -> list[str]:
    """The names in ``folder`` that a kotune run wrote (empty for a new or a foreign folder)."""
    if not folder.is_dir():
        return []
    found = [name for name in RUN_FILES if (folder / name).exists()]
    return found + sorted(p.name for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())


@contextlib.contextmanager
def claim(output_dir: Path, resume: bool, overwrite: bool) -> Iterator[Path | None]:
    """Hold ``output_dir`` for this run (see the module docstring); yields where an old run was moved, if one was.

    Rank 0 claims for every rank; all ranks learn whether it worked, so none waits for a run that never starts.
    """
    with contextlib.ExitStack() as held:
        error, aside = None, None
        if dist.is_main():
            try:
                writable_folder(output_dir)
                refuse_escaping_links(output_dir)  # before the lock file is created in it
                held.enter_context(lock(output_dir))
                aside = take_over(output_dir, resume, overwrite)
            except (RunFolderError, SecurityError) as exc:
                error = exc
        failed = torch.tensor(float(error is not None), device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce_sum(failed)
        if failed.item():
            raise error or RunFolderError(f"train.output_dir {output_dir}: the first process could not claim it")
        yield aside


def writable_folder(output_dir: Path) -> None:
    """Create ``output_dir``; refuse a path that is a file or a folder this process cannot write."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"train.output_dir {output_dir} is a file, not a folder; choose another path")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(
            f"train.output_dir {output_dir} cannot be created ({exc.strerror}); choose another path"
        ) from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise RunFolderError(f"train.output_dir {output_dir} is not writable (read-only?); choose another path")


@contextlib.contextmanager
def lock(output_dir: Path) -> Iterator[None]:
    """An exclusive lock on the folder for as long as the context runs; a second taker gets a clear error."""
    path = output_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:  # a read-only mount passes os.access for root, but not this
        raise RunFolderError(
            f"train.output_dir {output_dir} is not writable ({exc.strerror}); choose another path"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunFolderError(
                f"train.output_dir {output_dir} is in use by {holder}; wait for it to end (or stop it), "
                "or choose another train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def take_over(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to start a new run over an old one unless ``overwrite``, which moves the old run aside first."""
    found = run_files(output_dir)
    if resume or not found:
        return None
    aside = aside_name(output_dir)
    if not overwrite:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise RunFolderError(
            f"train.output_dir {output_dir} already holds a run ({shown}). Continue it with --resume, "
            f"start over with --overwrite (moves the old run to {aside.name}/ beside it), "
            "or choose another train.output_dir"
        )
    aside.mkdir()
    for entry in output_dir.iterdir():
        if entry.name != LOCK:
            os.rename(entry, aside / entry.name)
    return aside


def aside_name(output_dir: Path) -> Path:
    """``NAME.replaced-N`` beside the folder, the first N not taken (``.`` and ``..`` named by where they are)."""
    output_dir, n = output_dir.resolve(), 1
    while (candidate := output_dir.with_name(f"{output_dir.name}.replaced-{n}")).exists():
        n += 1
    return candidate
