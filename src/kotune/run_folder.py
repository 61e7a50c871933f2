"""A run folder's files, each named once, with their reads and writes.

What ``kotune train`` leaves in ``train.output_dir`` (and ``kotune merge`` in its ``--out``)::

    kotune_config.yaml          CONFIG: the resolved config
    kotune_template.yaml        TEMPLATE: the prompt template (``save_template`` / ``load_saved_template``)
    adapter_model.safetensors   ADAPTER, with adapter_config.json (ADAPTER_CONFIG): the LoRA adapter
    metrics.jsonl               METRICS: one JSON record per logged step or evaluation
    run_summary.json            SUMMARY: written last, whole, by a finished run (``write_summary``)
    best/                       BEST: the adapter with the lowest evaluation loss
    checkpoint-STEP/            CHECKPOINT_PREFIX: resumable state; COMPLETE (CHECKPOINT_MARKER) is written last,
                                beside fingerprint.json (FINGERPRINT) and best_adapter.safetensors (BEST_ADAPTER)
    .kotune-lock                LOCK: the process training into the folder
    merge_report.json           MERGE_REPORT (merged folders): what the merge was made of and how it verified
    kotune_merge_output.json    MERGE_MARKER (merged folders): the files kotune merge wrote
    report.md                   RUN_REPORT: ``kotune report``'s page

``open_folder`` reads a run or merged folder back as a ``ModelFolder``; merge, publish, chat, generate and eval
start from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from kotune.config import Config
from kotune.config_load import load_config
from kotune.data.formats import CHAT_FORMATS
from kotune.data.templates import Template, TemplateError, load_template
from kotune.errors import KotuneError
from kotune.paths import portable_path, saved_path
from kotune.security import redact

CONFIG = "kotune_config.yaml"
TEMPLATE = "kotune_template.yaml"
ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER)
METRICS = "metrics.jsonl"
SUMMARY = "run_summary.json"
BEST = "best"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "COMPLETE"
FINGERPRINT = "fingerprint.json"
BEST_ADAPTER = "best_adapter.safetensors"
LOCK = ".kotune-lock"
"""The lock file; it holds the pid, host and start time of the process training into the folder."""
MERGE_REPORT = "merge_report.json"
MERGE_MARKER = "kotune_merge_output.json"
"""Written last into every merge output, listing its files: ``merge --force`` replaces only a folder that has it."""
RUN_REPORT = "report.md"
RECORDS = (TEMPLATE, CONFIG, SUMMARY, METRICS)
"""The run's records a merged folder keeps a copy of."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
"""What a saved tokenizer leaves in a run or merged folder (``save_pretrained``; each file when present)."""


class FolderError(KotuneError, ValueError):
    """A folder that is not a kotune run or merged model, or lacks a file; the message names it."""


@dataclass(frozen=True)
class ModelFolder:
    """What a training run (adapter) or a merge (full model) left behind, read back."""

    path: Path
    merged: bool
    """True for a merged full model, False for a run folder holding a LoRA adapter."""
    config: Config
    """The run's resolved config."""
    template: Template
    """The prompt template training used."""
    fmt: str
    """The training rows' format (``alpaca``, ``prompt_completion``, ``messages``, ``sharegpt``)."""


# -- read a folder back ----------------------------------------------------------------------------
def open_folder(path: str | Path) -> ModelFolder:
    """Read a run folder (``adapter_config.json``) or a merged folder (``config.json``) with its saved config."""
    folder = Path(path)
    if not folder.is_dir():
        raise FolderError(f"{folder}: no such folder; give a training run's output_dir or a merged model folder")
    merged = not (folder / ADAPTER_CONFIG).is_file()
    if merged and not (folder / "config.json").is_file():
        raise FolderError(f"{folder}: holds neither {ADAPTER_CONFIG} (a run) nor config.json (a merged model)")
    if not (folder / CONFIG).is_file():
        raise FolderError(f"{folder}: no {CONFIG}; is this a kotune output folder?")
    cfg = load_config(folder / CONFIG).with_paths(lambda p: saved_path(p, folder))  # a merged folder's are relative
    return ModelFolder(folder, merged, cfg, load_saved_template(folder), training_format(cfg, folder / CONFIG))


def save_config_copy(cfg: Config, folder: Path) -> None:
    """A run's config into another of its folders (a merged model), its paths relative to ``folder`` or under ``~``
    (``paths.portable_path``): the folder names no folder of this machine, and still finds its data and base when
    moved with them; ``open_folder`` reads them back absolute."""
    portable = cfg.with_paths(lambda p: portable_path(p, folder))
    (folder / CONFIG).write_text(redact(portable.to_yaml()), encoding="utf-8")


def training_format(cfg: Config, where: Path) -> str:
    """The row format the run trained on; ``auto`` is detected again from the first row of its data. A preference
    run answers with the format its prompts were built like (``data.preference.prompt_format``)."""
    if cfg.data.format not in ("auto", "preference"):
        return cfg.data.format
    from kotune.data.formats import detect_format
    from kotune.data.preference import prompt_format
    from kotune.data.read import DataError, read_rows

    try:
        first = read_rows(cfg.data.path, cfg.data.split)[:1]
        return prompt_format(first[0]) if cfg.data.format == "preference" else detect_format(first, cfg.data.path)
    except DataError as exc:
        raise FolderError(
            f"{where}: data.format is auto and the training data cannot be read to tell it ({exc}); "
            "set data.format in that file"
        ) from None


def trained_chat_template(folder: ModelFolder, tokenizer) -> str | None:
    """For a run trained on instruction rows or raw prompts: a chat template rendering exactly its prompts
    (``templates.chat_template``), so tools that prompt through ``apply_chat_template`` use the trained format.
    None for runs trained on conversations: the tokenizer's template is the one they trained with."""
    from kotune.data.encoding import bos_id_to_add
    from kotune.data.templates import RAW_PROMPT, chat_template

    if folder.fmt in CHAT_FORMATS:
        return None
    template = folder.template if folder.fmt == "alpaca" else RAW_PROMPT
    return chat_template(template, tokenizer.bos_token if bos_id_to_add(tokenizer) is not None else None)


GENERATION_CONFIG = "generation_config.json"
"""A run folder's stop ids, written when it finishes (a merged folder's is the model's own)."""


def folder_stop_ids(folder: ModelFolder, tokenizer, model) -> list[int]:
    """``stop_ids`` for a run or merged folder: its chat template as training resolved it, and the EOS ids of its
    ``generation_config.json`` (a run folder's holds the base template's end of turn, recorded before its tokenizer
    took the trained prompt's template), else its model's."""
    from kotune.data.conversations import stop_ids
    from kotune.data.prepare import chat_template_for

    config = getattr(model, "generation_config", None)
    if not folder.merged and (folder.path / GENERATION_CONFIG).is_file():
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(folder.path)
    return stop_ids(tokenizer, config, chat_template_for(folder.config.data, tokenizer))


def generation_eos(stops: list[int]) -> int | list[int] | None:
    """``eos_token_id`` of a ``generation_config.json`` for these stop ids: the id, the list of several, or None
    for none (a tokenizer without EOS and a template without end of turn: the file then names no EOS, and
    generation ends at max_new_tokens)."""
    return stops[0] if len(stops) == 1 else (stops or None)


def save_run_tokenizer(folder: ModelFolder, tokenizer, model) -> None:
    """The run's tokenizer with a chat template rendering the prompts it trained on, so a tool that prompts through
    ``apply_chat_template`` uses the trained format; first the stop ids the base's template gives, into the folder's
    ``generation_config.json``."""
    from transformers import GenerationConfig

    stops = folder_stop_ids(folder, tokenizer, model)
    GenerationConfig(
        eos_token_id=generation_eos(stops),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(folder.path)
    tokenizer.chat_template = trained_chat_template(folder, tokenizer) or tokenizer.chat_template
    tokenizer.save_pretrained(folder.path)


# -- the template ---------------------------------------------------------------------------------
def save_template(template: Template, directory: str | Path) -> Path:
    """Write ``template`` beside the adapter, so inference prompts exactly as training did."""
    path = Path(directory) / TEMPLATE
    path.write_text(yaml.safe_dump(asdict(template), allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def load_saved_template(directory: str | Path) -> Template:
    """The template a run saved next to its adapter."""
    path = Path(directory) / TEMPLATE
    if not path.is_file():
        raise TemplateError(f"{directory}: no {TEMPLATE}; is this a kotune output folder?")
    return load_template(str(path))


# -- the model card ---------------------------------------------------------------------------------
MODEL_CARD = "README.md"
PEFT_BLANK_CARD = "# Model Card for Model ID"
"""The heading of the template card peft's ``save_pretrained`` writes: every field [More Information Needed]."""


def drop_blank_card(folder: str | Path) -> bool:
    """Remove the blank card peft wrote into ``folder`` (its template, naming the local base path); returns whether
    one was removed. A card someone wrote is kept. ``kotune push`` writes the true card for a repository."""
    card = Path(folder) / MODEL_CARD
    if not card.is_file() or PEFT_BLANK_CARD not in card.read_text(encoding="utf-8", errors="replace"):
        return False
    card.unlink()
    return True


# -- records --------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    """A JSON file's content, None when it is not there."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def merge_targets_note(report: dict) -> str | None:
    """What to say beside a merge report that checked the original weights but saved another target (run report,
    model card): that target's low top-1 agreement reads as a failure without it."""
    if "original" not in report.get("targets", {}) or report.get("into") == "original":
        return None
    return (
        f"The merge is checked against each target it could be made into; only `{report.get('into')}` is saved. The "
        "adapter was trained on the quantized base, so merging it into the original (unquantized) weights moves the "
        "model away from what was trained: a low top-1 agreement on `original` is expected and is no fault of the "
        "saved model."
    )


def read_metrics(folder: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` (none when the run logged nothing yet)."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return []
    from kotune.data.read import jsonl_lines

    return [json.loads(line) for line in jsonl_lines(path.read_text(encoding="utf-8")) if line.strip()]


def read_summary(folder: Path) -> dict | None:
    """``run_summary.json`` of a finished run, None before it finished."""
    return read_json(Path(folder) / SUMMARY)


def write_summary(folder: Path, summary: dict) -> None:
    """Write ``run_summary.json`` last and whole (renamed into place): its presence says the run finished and its
    adapter is there."""
    tmp = folder / f".tmp-{SUMMARY}"
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, folder / SUMMARY)
