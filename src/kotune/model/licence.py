"""A base model's licence, as one record for ``kotune train`` (its notice), the model card and ``kotune push``.

It comes from the preset whose hub id is the base's ``model.path`` (kotune's own record, ``kotune.presets``), else
from the ``license`` in the base's own model card when that card is on this machine; nothing is downloaded for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from kotune import output
from kotune.presets import preset_for_model

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
NON_COMMERCIAL = re.compile(r"(^|-)nc($|-)")
"""Licence ids with a non-commercial clause (``cc-by-nc-4.0``, ``cc-by-nc-sa-4.0``): the hub's ``-nc`` family."""
COMMERCIAL = ("apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "openrail", "llama3", "llama3.1", "gemma")
"""Hub licence ids known here to allow commercial use (some with conditions of their own)."""


@dataclass(frozen=True)
class Licence:
    id: str
    """The hub's licence id (``apache-2.0``, ``llama3.1``, ``other``)."""
    name: str
    commercial_use: bool | None
    """False for a non-commercial licence; None where it is not known here."""
    source: str
    """Where kotune read it: ``kotune preset NAME`` or ``the base's model card``."""


def hub_model_id(spec: str) -> str | None:
    """``spec`` when it names a hub model (``owner/name``), not a local folder, GGUF file or pypi: spec."""
    if spec.startswith("pypi:") or spec.endswith(".gguf") or Path(spec).exists():
        return None
    return spec if REPO_ID.fullmatch(spec) else None


def base_licence(spec: str) -> Licence | None:
    """The licence of the base model ``spec`` (a config's ``model.path``): the preset's, else its card's."""
    preset = preset_for_model(spec)
    if preset is not None:
        return Licence(preset.license, preset.license_name, preset.commercial_use, f"kotune preset {preset.name}")
    found = base_license(spec)
    if found is None:
        return None
    commercial = False if NON_COMMERCIAL.search(found) else True if found in COMMERCIAL else None
    return Licence(found, found, commercial, "the base's model card")


def non_commercial_notice(spec: str) -> str | None:
    """One line for a base whose licence forbids commercial use (None otherwise)."""
    lic = base_licence(spec)
    if lic is None or lic.commercial_use is not False:
        return None
    return (
        f"the base model {spec} is under the {lic.name} ({lic.source}): non-commercial use only, and models "
        "trained from it (this adapter, a merge of it) carry the same terms"
    )


def warn_if_non_commercial(spec: str) -> None:
    """``kotune train``'s first word on a non-commercial base: its notice, as one warning line."""
    notice = non_commercial_notice(spec)
    if notice:
        output.warn(notice)


def base_license(spec: str) -> str | None:
    """The ``license`` in the base model's own card, when that card is on this machine (a local folder, or the
    hub cache); nothing is downloaded for it."""
    card = Path(spec) / "README.md"
    if not card.is_file() and hub_model_id(spec):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "README.md")
        card = Path(cached) if isinstance(cached, str) else card
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---\n"):
        return None
    try:
        meta = yaml.safe_load(text.split("---\n", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    return meta.get("license") if isinstance(meta, dict) and isinstance(meta.get("license"), str) else None
