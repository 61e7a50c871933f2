"""Row formats rendered to segments: ``(text, trained)`` pairs that tokenization encodes one by one.

Rendering a row as separate segments is what makes the label mask exact: each segment is encoded on its
own and the ids are concatenated, so a prompt's tokens can never merge with the response's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kotune.data.read import DataError, columns_present
from kotune.data.templates import Template

CHAT_FORMATS = ("messages", "sharegpt")
"""Row formats whose prompts come from a chat template (the tokenizer's or ``data.chat_template``)."""


@dataclass(frozen=True)
class Rendered:
    row: int
    """The row's position in its source (``_row``)."""
    segments: list[tuple[str, bool]]
    """Texts in order with whether their tokens are trained."""
    append_eos: bool = True
    """Add the tokenizer's EOS (trained) after the last segment."""
    kinds: tuple[str, ...] = ()
    """Conversations: each segment's kind (``kotune.data.turn_parts``: prompt, reasoning, content, ...)."""
    notes: tuple[str, ...] = ()
    """Conversations: where the template renders a turn differently from the data (``messages[2]: ...``)."""


class SkipRow(Exception):
    """A row that is left out and counted (e.g. a null output), with the reason."""


FORMAT_COLUMNS = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
}
"""Columns each format requires."""

OPTIONAL_COLUMNS = {"alpaca": ("input",), "messages": ("tools",), "sharegpt": ("tools",)}
"""Columns a format reads when present (alpaca's ``input``: absent or empty uses the no-input prompt;
conversations' ``tools``: the JSON-schema list of functions the chat template shows the model)."""


def used_columns(fmt: str) -> tuple[str, ...]:
    """Every column a format reads, required first."""
    return FORMAT_COLUMNS[fmt] + OPTIONAL_COLUMNS.get(fmt, ())


LABELS = {"true": True, "false": False, "1": True, "0": False}
"""KTO label spellings besides JSON's booleans (case and surrounding spaces ignored; the integers 1 and 0 too)."""


def desirable(label: Any) -> bool | None:
    """A KTO label as a bool (``LABELS``), or None when it is none of the spellings read."""
    if isinstance(label, bool):
        return label
    if isinstance(label, int) and label in (0, 1):
        return bool(label)
    return LABELS.get(label.strip().lower()) if isinstance(label, str) else None


def detect_format(rows: list[dict[str, Any]], where: str, remedy: str | None = None) -> str:
    """The format whose required columns the first row has; ``remedy``: what the error says to do when none fits
    (training's default: map the columns with ``data.columns``)."""
    if not rows:
        raise DataError(f"{where}: no rows")
    columns = set(rows[0])
    if {"prompt", "completion", "label"} <= columns and desirable(rows[0]["label"]) is not None:
        raise DataError(
            f"{where}: rows with prompt, completion and a true / false label are unpaired preference data; "
            "train them with train.objective=kto (SFT would also learn the completions labelled false), or drop "
            "the label column to train on every completion"
        )
    for name, required in FORMAT_COLUMNS.items():
        if set(required) <= columns:
            return name
    present = ", ".join(sorted(c for c in columns if not c.startswith("_")))
    if {"chosen", "rejected"} <= columns:
        raise DataError(
            f"{where}: rows with chosen and rejected responses are preference pairs (columns present: {present}): "
            "`kotune train` trains them with train.objective=dpo, orpo, simpo or kto, not sft"
            + (f"; {remedy}" if remedy else "")
        )
    remedy = remedy or "Map yours with data.columns, e.g. data.columns={instruction: question, output: answer}"
    raise DataError(
        f"{where}: cannot tell the row format; expected columns instruction/input/output (alpaca), "
        f"prompt/completion, messages or conversations; columns present: {present}. {remedy}"
    )


def check_columns(rows: list[dict[str, Any]], fmt: str, where: str) -> None:
    """Every required column is present in the rows; names the missing one and the columns present."""
    present = columns_present(rows)
    for column in FORMAT_COLUMNS[fmt]:
        if column not in present:
            raise DataError(
                f"{where}: column '{column}' is missing (format {fmt}); columns present: {', '.join(present)}. "
                "Map yours with data.columns, e.g. data.columns={" + column + ": your_column}"
            )


def check_one_format(rows: list[dict[str, Any]], fmt: str, where: str) -> None:
    """No row has another format's columns instead of ``fmt``'s (e.g. a folder of alpaca and messages files,
    whose odd rows would otherwise be skipped one by one as missing their columns)."""
    for row in rows:
        present = {k for k, v in row.items() if v is not None}
        if set(FORMAT_COLUMNS[fmt]) <= present:
            continue
        other = next((name for name, cols in FORMAT_COLUMNS.items() if set(cols) <= present), None)
        if other is not None:
            origin = row.get("_source", where)
            raise DataError(
                f"{where}: mixed formats in one source: {fmt} rows, but row {row['_row']} ({origin}) is {other}; "
                "give each format its own entry in data.sources"
            )


def _text(row: dict[str, Any], key: str, where: str, optional: bool = False) -> str | None:
    value = row.get(key)
    if value is None:
        if optional:
            return None
        raise SkipRow(f"null {key}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(
            f"{row.get('_source', where)} (row {row['_row']}): column '{key}' holds a "
            f"{type(value).__name__}, expected text"
        )
    return str(value)


def render_alpaca(row: dict[str, Any], template: Template, train_on_inputs: bool, where: str) -> Rendered:
    instruction = _text(row, "instruction", where)
    output = _text(row, "output", where)
    prompt = template.format(instruction, _text(row, "input", where, optional=True))
    return Rendered(row["_row"], [(prompt, train_on_inputs), (output, True)])


def render_prompt_completion(row: dict[str, Any], train_on_inputs: bool, where: str) -> Rendered:
    prompt = _text(row, "prompt", where)
    completion = _text(row, "completion", where)
    return Rendered(row["_row"], [(prompt, train_on_inputs), (completion, True)])
