"""What kotune refuses to do: write outside the output folder, load pickle, or persist a hub token.

* Every path kotune writes under ``train.output_dir`` goes through ``inside``: a name from a config or a
  symlink planted in the folder cannot send a write elsewhere.
* Pickle files (``.bin``, ``.pt``, ...) can run code when loaded. kotune writes safetensors only, and
  ``refuse_pickle`` stops a load from a folder that holds pickle weights unless the config allows it.
* Hub tokens come from the environment (``HF_TOKEN``) or ``huggingface-cli login`` and are never written:
  text kotune saves (the resolved config, fingerprints) passes through ``redact`` first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kotune.config import ConfigError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""File types that ``torch.load`` / ``pickle.load`` would read; safetensors has none of their risk."""

TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
"""Environment variables huggingface_hub reads a token from."""

TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
"""The shape of a Hugging Face access token, so one pasted into a config field is caught too."""

REDACTED = "<redacted>"


class SecurityError(ConfigError):
    """A path or file kotune refuses for safety; the message names it and says what to do."""


def inside(root: str | Path, *parts: str | Path) -> Path:
    """``root/parts...``, refused if it resolves (symlinks followed) outside ``root``."""
    base = Path(root).resolve()
    target = base.joinpath(*parts)
    resolved = target.resolve()
    if resolved != base and base not in resolved.parents:
        raise SecurityError(
            f"{target} resolves to {resolved}, outside the output folder {base}; "
            "kotune only writes inside train.output_dir (remove the symlink or fix the path)"
        )
    return target


def refuse_escaping_links(output_dir: str | Path) -> None:
    """Raise SecurityError if a symlink under ``output_dir`` points outside it (kotune would write through it)."""
    root = Path(output_dir)
    if not root.is_dir():
        return
    for path in root.rglob("*"):
        if path.is_symlink():
            inside(root, path.relative_to(root))


def pickle_files(folder: str | Path) -> list[Path]:
    """Pickle-format files directly in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def refuse_pickle(folder: str | Path, allow: bool, what: str, flag: str) -> None:
    """Raise SecurityError if ``folder`` holds pickle weights and no safetensors, unless ``allow``.

    ``what`` names the folder's role in the message; ``flag`` is the setting that allows pickle.
    """
    found = pickle_files(folder)
    if allow or not found or any(Path(folder).glob("*.safetensors")):
        return
    raise SecurityError(
        f"{what} {folder} holds pickle files ({', '.join(p.name for p in found)}) and no safetensors; "
        f"loading pickle can run arbitrary code. Convert the weights to safetensors, or set {flag} "
        "if you trust where they came from"
    )


def known_tokens() -> list[str]:
    """Hub tokens this process could use: from the environment and from ``huggingface-cli login``'s file."""
    tokens = [os.environ[name].strip() for name in TOKEN_ENV_VARS if os.environ.get(name)]
    try:
        from huggingface_hub import constants

        saved = Path(constants.HF_TOKEN_PATH)
        if saved.is_file():
            tokens.append(saved.read_text(encoding="utf-8").strip())
    except (ImportError, OSError, UnicodeDecodeError):  # no hub client or an unreadable file: nothing to hide
        pass
    return [t for t in tokens if len(t) >= 8]  # shorter is no real token, and replacing it would mangle text


def redact(text: str) -> str:
    """``text`` with every known hub token, and anything shaped like one, replaced by ``<redacted>``."""
    for token in known_tokens():
        text = text.replace(token, REDACTED)
    return TOKEN_PATTERN.sub(REDACTED, text)


LOCAL_PATH = re.compile(r"(?<![\w/~])~?/[^\s/]+(?:/[^\s/]+)+")
"""An absolute (or home-relative) path of at least two parts inside a text, e.g. the data file an audit line names."""


def portable(value):
    """``value`` (parsed JSON / YAML) with each absolute local path replaced by its last part, also inside text:
    what goes into a file a user may share (a pushed repository, ``report.md``) names no folder of this machine."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and (value.startswith(("~", "./", "../")) or Path(value).is_absolute()):
        return Path(value).name  # a relative path too: a merged folder's config names its data relative to it
    if isinstance(value, str):
        return LOCAL_PATH.sub(lambda m: Path(m.group()).name, value)
    return value
