"""One exported file written whole or not at all: free space checked first, written beside its target under a
hidden name (``.NAME.partial-XXXX``), renamed into place when complete.

The partial file is locked (``fcntl.flock``) while it is written. The kernel drops the lock when the writing
process ends, however it ends, so a later export of the same target can tell the partial of an export killed with
``kill -9`` (unlocked: removed, and said) from one another export is writing now (locked: left alone).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kotune import output
from kotune.export.gguf_tokenizer import ExportError


def partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def check_free_space(out: Path, needed: int) -> None:
    """Refuse before writing when the disk holding ``out`` has less than ``needed`` bytes free."""
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())  # the folder may not exist yet
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ExportError(
            f"{out}: needs about {needed / 1e9:.2f} GB and {folder} has {free / 1e9:.2f} GB free; "
            "free some space, or choose --out on another disk"
        )


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove partial files of ``out`` that no process is writing (left by a killed export); returns them."""
    removed = []
    for path in sorted(out.parent.glob(f"{partial_prefix(out)}*")):
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another export of the same target is writing it
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        names = ", ".join(p.name for p in removed)
        output.info(f"kotune: removed {len(removed)} partial file(s) left by an interrupted export: {names}")
    return removed


@contextmanager
def partial_file(out: Path, needed: int) -> Iterator[Path]:
    """A locked hidden file beside ``out`` to write into; renamed to ``out`` when the block ends without error.

    The disk is checked for ``needed`` bytes first; a write that fails anyway (a full disk) leaves no partial file
    and ends in an ``ExportError`` naming ``out``.
    """
    check_free_space(out, needed)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=partial_prefix(out))
    partial = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield partial
        os.replace(partial, out)
    except OSError as exc:
        raise ExportError(f"{out}: could not be written ({exc}); no partial file is left") from exc
    finally:
        partial.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def sibling(partial: Path, tag: str) -> Iterator[Path]:
    """A second locked file beside ``partial`` under its hidden prefix (an intermediate file, such as the 16-bit
    GGUF a k-quant is made from): a later export removes it like the partial if this one is killed; removed when the
    block ends."""
    path = partial.with_name(f"{partial.name}-{tag}")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
