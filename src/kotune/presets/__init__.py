"""Presets: the bases people fine-tune, each one YAML file in this folder, every fact about a base stated once.

A preset holds what kotune knows of a base model (hub id, architecture, chat template and the tokens that close an
assistant turn, licence and whether it allows commercial use, the shape ``kotune plan`` needs, and where each fact
was checked) and a starting recipe: the config sections ``kotune init --preset NAME`` writes, with their comments.
The hub id is the recipe's ``model.path``; a run whose ``model.path`` is a preset's hub id uses that preset's facts
(its licence in the model card, the notice at ``kotune train``).

This module sits in kotune's core layer (beside ``config``): the plan, the model loader's licence record, the model
card and the commands read it; it reads only YAML and the config.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from kotune.config import Config
from kotune.config_load import config_from_text
from kotune.errors import KotuneError

FOLDER = Path(__file__).resolve().parent
RECIPE = "recipe:"
"""The last top-level key of a preset file: everything under it is the config ``kotune init`` writes."""
FACTS = ("title", "architecture", "chat_template", "stop_tokens", "license", "license_name", "commercial_use",
         "fits", "checked", "shape")  # fmt: skip
"""The keys before ``recipe``, all required."""


class UnknownPreset(KotuneError, ValueError):
    """A preset name kotune does not ship; the message lists the ones it does."""

    refusal = True


@dataclass(frozen=True)
class Preset:
    name: str
    """The file's name without ``.yaml``: what ``--preset`` takes."""
    title: str
    """The model's own name, e.g. ``Qwen3-8B``."""
    architecture: str
    """``model_type`` in the base's ``config.json``."""
    chat_template: str
    """Which template the base's tokenizer carries (its family and how turns are framed), or that it has none."""
    stop_tokens: tuple[str, ...]
    """The text that closes an assistant turn in that template (the end-of-turn token(s)), in order."""
    license: str
    """The licence id the hub's model-card metadata uses (``apache-2.0``, ``llama3.1``, ``gemma``, ``other``)."""
    license_name: str
    """The licence's own name."""
    commercial_use: bool | None
    """Whether the licence allows commercial use; None where kotune has not established it (read the licence)."""
    fits: dict[str, bool]
    """GPU name (``kotune plan --gpu``) -> whether the recipe is meant to fit it; a test holds the plan to it."""
    checked: dict[str, str]
    """Fact -> where it was checked, or that it was not."""
    shape: dict[str, Any]
    """``config.json`` keys of the architecture (sizes, heads, windows, tied embeddings): what ``kotune plan`` needs
    without the hub. ``model_type`` here, where given, is the text part's of a multimodal base."""
    recipe_text: str
    """The recipe as YAML text, comments kept: what ``kotune init`` writes."""
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def hub_id(self) -> str:
        return self.recipe["model"]["path"]

    def config(self, overrides: list[str] | None = None) -> Config:
        """The recipe as a checked ``Config`` (kotune's defaults for everything it does not set)."""
        return config_from_text(self.recipe_text, f"preset {self.name}", overrides)

    def model_config(self):
        """A transformers ``PretrainedConfig`` of the base's architecture built from ``shape`` (no hub)."""
        from transformers import AutoConfig

        sizes = {k: v for k, v in self.shape.items() if k != "model_type"}
        return AutoConfig.for_model(self.shape.get("model_type", self.architecture), **sizes)


def _read(path: Path) -> Preset:
    text = path.read_text(encoding="utf-8")
    head, sep, recipe_text = text.partition(f"\n{RECIPE}\n")
    if not sep:
        raise ValueError(f"{path}: no top-level '{RECIPE}' section (it must come last)")
    facts = yaml.safe_load(head) or {}
    missing = [k for k in FACTS if k not in facts]
    unknown = [k for k in facts if k not in FACTS]
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}")
    recipe_text = textwrap.dedent(recipe_text)
    shape = dict(facts["shape"])
    return Preset(
        name=path.stem,
        title=facts["title"],
        architecture=facts["architecture"],
        chat_template=facts["chat_template"],
        stop_tokens=tuple(facts["stop_tokens"]),
        license=facts["license"],
        license_name=facts["license_name"],
        commercial_use=facts["commercial_use"],
        fits=dict(facts["fits"]),
        checked=dict(facts["checked"]),
        shape=shape,
        recipe_text=recipe_text,
        recipe=yaml.safe_load(recipe_text),
    )


@cache
def presets() -> dict[str, Preset]:
    """Every shipped preset by name, in name order."""
    return {p.stem: _read(p) for p in sorted(FOLDER.glob("*.yaml"))}


def preset_named(name: str) -> Preset:
    try:
        return presets()[name]
    except KeyError:
        raise UnknownPreset(f"unknown preset {name!r}; kotune has: {', '.join(presets())}") from None


def preset_for_model(path: str) -> Preset | None:
    """The preset whose hub id is ``path`` (as a config's ``model.path`` names it), if any."""
    return next((p for p in presets().values() if p.hub_id == path), None)


def commercial_words(value: bool | None) -> str:
    """``yes`` / ``no`` / ``not established``: how the list and the card say ``commercial_use``."""
    return {True: "yes", False: "no (non-commercial)", None: "not established (read the licence)"}[value]
