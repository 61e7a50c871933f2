"""The audit's conversation checks: what the trained tokens are (reasoning, content, tool calls), reasoning the
cutoff cuts, turns the chat template renders differently from the data, and tool calls that do not fit their tool's
JSON schema (a small check of the schema's required keys, types and enums; no schema library needed)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from kotune.data.chat_rows import read_conversation, tool_name
from kotune.data.formats import Rendered, SkipRow
from kotune.data.read import DataError
from kotune.data.turn_parts import CONTENT, EMPTY_THINK, END, REASONING, TOOL_CALLS

TRAINED_PARTS = (REASONING, CONTENT, TOOL_CALLS, END, EMPTY_THINK)
"""Kinds whose trained tokens the audit counts, in the order it reports them."""

JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


def trained_parts(rendered: list[Rendered], segment_tokens: np.ndarray, bos: bool, cutoff_len: int):
    """Trained tokens per kind within the cutoff, and the rows whose trained reasoning the cutoff cuts: begun within
    it, finished past it (a row cut before its reasoning starts loses the whole turn: the audit's other checks)."""
    counts: Counter = Counter()
    cut_rows: list[int] = []
    at = 0
    for row in rendered:
        n = len(row.segments)
        lengths = segment_tokens[at : at + n].tolist()
        at += n
        if not row.kinds:
            continue
        position, cut = int(bos), False
        for (_, trained), kind, length in zip(row.segments, row.kinds, lengths, strict=True):
            kept = max(0, min(length, cutoff_len - position))
            if trained:
                counts[kind] += kept
            cut |= kind == REASONING and trained and 0 < kept < length  # begun but not finished
            position += length
        if cut:
            cut_rows.append(row.row)
    return {kind: counts[kind] for kind in TRAINED_PARTS if counts[kind]}, cut_rows


def rendering_differences(rendered: list[Rendered]) -> dict[str, list[int]]:
    """Rows by what their template renders differently from the data (``reasoning dropped``, ...)."""
    rows: dict[str, list[int]] = {}
    for row in rendered:
        for what in dict.fromkeys(note.split(": ", 1)[1] for note in row.notes):
            rows.setdefault(what, []).append(row.row)
    return rows


def empty_think_rows(rendered: list[Rendered]) -> tuple[list[int], bool]:
    """Rows with an empty think block the template inserted, and whether those blocks are trained."""
    rows, trained = [], False
    for row in rendered:
        flags = [t for (_, t), kind in zip(row.segments, row.kinds, strict=False) if kind == EMPTY_THINK]
        if flags:
            rows.append(row.row)
            trained |= any(flags)
    return rows, trained


def tool_call_problems(rows: list[dict[str, Any]], fmt: str, where: str) -> dict[int, list[str]]:
    """Per row, what is wrong with its tool calls: an unknown function, arguments that are not a JSON object,
    or arguments that break the tool's ``parameters`` schema."""
    problems: dict[int, list[str]] = {}
    for row in rows:
        try:
            conversation = read_conversation(row, fmt, where)
        except (SkipRow, DataError):  # counted where the row is rendered
            continue
        tools = {tool_name(t): t for t in conversation.tools or []}
        found = []
        for message in conversation.messages:
            for call in message.get("tool_calls", []):
                found += call_problems(call["function"], tools)
        if found:
            problems[row["_row"]] = found
    return problems


def call_problems(function: dict[str, Any], tools: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with one call ``{name, arguments}`` against the row's tools (none: ``[]``)."""
    name, arguments = function["name"], function["arguments"]
    if not isinstance(arguments, dict):
        return [f"{name}: arguments are not a JSON object"]
    if not tools:
        return []  # no schema to check against
    if name not in tools:
        return [f"{name}: no such tool in the row's tools"]
    tool = tools[name]
    schema = (tool.get("function") if isinstance(tool.get("function"), dict) else tool).get("parameters") or {}
    return [f"{name}: {problem}" for problem in schema_problems(arguments, schema, "arguments")]


def schema_problems(value: Any, schema: dict[str, Any], where: str) -> list[str]:
    """A value against a JSON schema's ``type``, ``enum``, ``required``, ``properties`` and ``items`` (the parts
    tool definitions use); other keywords are not checked."""
    expected = schema.get("type")
    types = [expected] if isinstance(expected, str) else expected or []
    if types and not any(_is_type(value, t) for t in types):
        return [f"{where} is {_json_type(value)}, expected {' or '.join(types)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where} is {json.dumps(value, ensure_ascii=False)}, not one of {schema['enum']}"]
    found = []
    if isinstance(value, dict):
        found += [f"{where}.{key} is missing" for key in schema.get("required", []) if key not in value]
        for key, sub in (schema.get("properties") or {}).items():
            if key in value and isinstance(sub, dict):
                found += schema_problems(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += schema_problems(item, schema["items"], f"{where}[{i}]")
    return found


def _is_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False  # JSON's true is no number
    return isinstance(value, JSON_TYPES.get(name, (object,)))


def _json_type(value: Any) -> str:
    return next((name for name, kinds in JSON_TYPES.items() if _is_type(value, name)), type(value).__name__)
