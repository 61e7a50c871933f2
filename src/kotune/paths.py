"""Where kotune keeps its cache, and which references name a local path: facts data and model both read.

A core module, so ``data`` (the tokenization cache, local data files) need not reach up into ``model.assets``.
"""

from __future__ import annotations

import os
from pathlib import Path

CHOICE_SET = Path(__file__).resolve().parents[2] / "data" / "ko-choice-smoke.jsonl"
"""kotune's bundled Korean multiple-choice smoke set (CC0): what ``kotune eval`` scores by default, and what the
data audit checks training rows against (``kotune.data.contamination``)."""


def cache_root(cache_dir: str | None = None) -> Path:
    """Return the cache dir: the argument, else ``$KOTUNE_CACHE``, else ``~/.cache/kotune``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("KOTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kotune"


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local file or folder, existing or not; such a path is never sent to the hub.

    Hub names are ``NAME`` or ``ORG/NAME``: a path starting with ``/``, ``.`` or ``~``, with more than one ``/``,
    or whose parent folder exists here is local.
    """
    parent = Path(path).expanduser().parent
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or (parent != Path(".") and parent.is_dir())


def portable_path(path: str, folder: str | Path) -> str:
    """``path`` as a config saved in ``folder`` keeps it, naming no folder of this machine where it can: an absolute
    path relative to ``folder`` (``./…``, ``../…``) when the two share a folder below the home folder (a project
    holding data, runs and merges: they move together), else under the home folder as ``~/…``; anything else (a
    hub name, a relative path, a path outside home sharing no folder with ``folder``) as it is.
    ``saved_path`` reads it back."""
    if not Path(path).is_absolute():
        return path
    target, where, home = Path(os.path.abspath(path)), Path(os.path.abspath(folder)), Path.home()
    shared = Path(os.path.commonpath([target, where]))
    if shared != Path(shared.anchor) and shared != home and shared not in home.parents:
        relative = os.path.relpath(target, where)
        return relative if relative.startswith("..") or relative == "." else f"./{relative}"
    if home in target.parents:
        return f"~/{target.relative_to(home).as_posix()}"
    return path


def saved_path(path: str, folder: str | Path) -> str:
    """A path as ``portable_path`` saved it in ``folder``, absolute again: ``~/…`` under this home folder, ``./…`` or
    ``../…`` from ``folder`` when it exists there. Anything else as it is: a relative path that is not there is read
    from the working directory, as in configs kotune saved before it recorded absolute paths."""
    if path.startswith("~"):
        return str(Path(path).expanduser())
    relative = path in (".", "..") or path.startswith(("./", "../"))
    if relative and (Path(folder) / path).exists():
        return os.path.normpath(os.path.abspath(Path(folder) / path))
    return path
