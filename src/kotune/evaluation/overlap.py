"""Which of ``kotune eval``'s scores were measured on rows the run trained on.

The run's training rows are read again from its config (each source's rows less those it held out, as
``kotune.data.prepare`` splits them) and searched, as the training audit searches them
(``kotune.data.contamination``), for the text of the evaluated rows: the held-out rows' reference answers (their
prompts when they have none) and the multiple-choice questions. A score whose rows overlap is marked in the table
(``kotune.evaluation.tables``): it measures memory of those rows, not skill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kotune.data.contamination import find_overlaps
from kotune.data.mixture import held_out_share, source_data, source_list
from kotune.data.read import DataError, apply_columns, read_rows, split_indices


def row_text(value: Any) -> str:
    """Every string a row holds (conversation turns included), joined: what a training row may copy."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(row_text(v) for k, v in value.items() if not str(k).startswith("_"))
    if isinstance(value, list):
        return " ".join(row_text(v) for v in value)
    return ""


def training_texts(cfg) -> list[list[tuple[int, str]]]:
    """Per training source, ``(row, text)`` of the rows the run trained on (its held-out rows left out)."""
    data = cfg.data
    out = []
    for source in source_list(data):
        d = source_data(data, source)
        rows = apply_columns(read_rows(d.path, d.split), d.columns, d.path)
        train, _ = split_indices(len(rows), held_out_share(data, source), data.seed)
        train = train[: d.max_rows] if d.max_rows is not None else train
        out.append([(rows[i]["_row"], row_text(rows[i])) for i in train])
    return out


def overlapping(training: Sequence[Sequence[tuple[int, str]]], parts: dict[str, list[tuple[int, str]]]) -> dict:
    """Per evaluated part (``heldout``, ``choice``: ``(row, text)`` of its rows), the rows whose text the training
    rows hold: ``{part: {"rows": [...], "of": n}}``, parts without overlap left out."""
    found: dict[str, set[int]] = {}
    for o in find_overlaps(training, parts):
        found.setdefault(o.ref, set()).add(o.ref_row)
    return {part: {"rows": sorted(rows), "of": len(parts[part])} for part, rows in found.items()}


def eval_overlap(cfg, heldout: list[tuple[int, str]], choice: list[tuple[int, str]]) -> dict:
    """``overlapping`` against the run's training rows; ``{"unchecked": why}`` when they cannot be read again, or
    are too many to hold (a ``data.streaming`` run's)."""
    if cfg.data.streaming:
        return {"unchecked": "the run streamed its data (data.streaming), too much to search at once"}
    try:
        training = training_texts(cfg)
    except DataError as exc:
        return {"unchecked": f"the run's training data could not be read ({exc})"}
    return overlapping(training, {"heldout": heldout, "choice": choice})
