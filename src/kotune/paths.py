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
