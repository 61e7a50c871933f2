"""Preference data for a run (``train.objective`` dpo / orpo / simpo / kto): rows read, checked to be pairs (or
unpaired KTO responses), rendered and encoded, audited, and split into train and held-out units."""

from __future__ import annotations

from dataclasses import dataclass

from kotune.config import Config
from kotune.data.audit import AuditReport
from kotune.data.preference import (
    PreferenceData,
    PreferencePair,
    UnpairedResponse,
    is_preference,
    is_unpaired,
    pair_examples,
    render_pairs,
)
from kotune.data.preference_audit import audit_pairs
from kotune.data.read import DataError, apply_columns, read_rows, split_indices
from kotune.data.templates import Template, load_template


@dataclass
class PreparedPairs:
    """A preference run's data: ``data.prepare.Prepared``'s counterpart, with pairs (or unpaired responses) as
    the units."""

    train: list[PreferencePair | UnpairedResponse]
    validation: list[PreferencePair | UnpairedResponse]
    audits: tuple[AuditReport, ...]
    template: Template
    chat_template: str | None

    @property
    def unit(self) -> str:
        return "responses" if self.train and isinstance(self.train[0], UnpairedResponse) else "pairs"

    def examples(self, split: str) -> list:
        """The ``split``'s units as ``Example`` rows, each response after its prompt (``pair_examples``): what
        ``kotune data`` shows and the fingerprint hashes."""
        return pair_examples(self.train if split == "train" else self.validation)


def _source(spec: str, split: str, cfg: Config, template: Template, tokenizer) -> tuple[PreferenceData, AuditReport]:
    rows = apply_columns(read_rows(spec, split), cfg.data.columns, spec)
    unpaired = not is_preference(rows) and is_unpaired(rows)
    if cfg.data.format not in ("auto", "preference") or not (is_preference(rows) or unpaired):
        raise DataError(
            f"{spec}: train.objective={cfg.train.objective} needs preference rows: columns prompt (or instruction), "
            "chosen and rejected (for kto also prompt, completion and a true / false label); map yours with "
            "data.columns"
        )
    if unpaired and cfg.train.objective != "kto":
        raise DataError(
            f"{spec}: rows of prompt, completion and label are unpaired preference data, which only "
            f"train.objective=kto trains on ({cfg.train.objective} needs chosen and rejected responses of one prompt)"
        )
    data = render_pairs(rows, cfg, template, tokenizer, spec)
    return data, audit_pairs(spec, data, len(rows), cfg.data.cutoff_len, cfg.preference.max_prompt_len)


def prepare_pairs(cfg: Config, tokenizer) -> PreparedPairs:
    """Train and held-out pairs (``data.validation_path``, else ``data.val_size`` of the rows) with their audits."""
    d, template = cfg.data, load_template(cfg.data.template)
    main, audit = _source(d.path, d.split, cfg, template, tokenizer)
    by_row = {p.row: p for p in main.pairs}
    if d.validation_path:
        val, val_audit = _source(d.validation_path, "validation", cfg, template, tokenizer)
        train, validation, audits = main.pairs, val.pairs, (audit, val_audit)
    else:
        train_rows, val_rows = split_indices(audit.rows, d.val_size, d.seed)
        train = [by_row[r] for r in train_rows if r in by_row]
        validation, audits = [by_row[r] for r in val_rows if r in by_row], (audit,)
    if d.max_rows is not None:
        train = train[: d.max_rows]
    return PreparedPairs(train, validation, audits, template, main.chat_template)
