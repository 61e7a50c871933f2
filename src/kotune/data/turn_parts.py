"""The parts of one assistant turn in a chat template's rendering: reasoning, content, tool calls, end-of-turn.

The template's text is the truth: a part is located where the template put the turn's own text, and a turn the
template renders differently from the data (a reasoning block it drops, content it leaves out, tool calls it omits
or re-orders) is reported, never patched. The cuts between parts fall where re-encoding each part alone gives the
template's own ids: after the whitespace that follows ``</think>`` (a line start), before an added token such as
``<tool_call>``, and before the end-of-turn special token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from kotune.data.chat_rows import THINK_CLOSE, THINK_OPEN, split_reasoning, tool_name

REASONING, EMPTY_THINK, CONTENT, TOOL_CALLS, END = "reasoning", "empty_think", "content", "tool_calls", "end"
PROMPT = "prompt"
"""Kinds of rendered text: the four parts of an assistant turn, a think block with nothing in it that the template
inserted, and ``prompt`` for everything else (system, user, tool results, template markup between turns)."""

EMPTY_THINK_BLOCK = re.compile(rf"\s*{re.escape(THINK_OPEN)}\s*{re.escape(THINK_CLOSE)}\s*")


@dataclass
class TurnParts:
    """Where one assistant turn's parts lie in the rendered conversation, and how it differs from the data."""

    parts: list[tuple[str, int, int]]
    """``(kind, start, end)`` character spans in order, covering the turn without gaps."""
    differences: list[str] = field(default_factory=list)
    """What the template renders differently from the data, e.g. ``reasoning dropped``."""

    @property
    def end(self) -> int:
        return self.parts[-1][2]


@dataclass
class Found:
    """Where the turn's own texts are in the rendering (None: not rendered), and what the template left out."""

    reasoning: tuple[int, int] | None
    content: tuple[int, int] | None
    calls: tuple[int, int] | None
    """From the first call's name to the last call's."""
    differences: list[str]

    def end(self, start: int) -> int:
        """Just after the last text found (``start`` when none was)."""
        return max([start] + [span[1] for span in (self.reasoning, self.content, self.calls) if span])


def find_texts(full: str, start: int, limit: int, message: dict[str, Any], opens_by: int) -> Found:
    """The turn's reasoning, content and tool calls in ``full[start:limit]``, each after the one before and each
    starting by ``opens_by`` (the turn's first end-of-turn token: its text may hold one, so it is searched past)."""
    reasoning, answer = split_reasoning(message)
    found = Found(None, None, None, [])
    at = start
    for name, text in (("reasoning", reasoning.strip()), ("content", answer.strip())):
        span = _find(full, text, at, limit, opens_by)
        if text and span is None:
            found.differences.append("reasoning dropped" if name == "reasoning" else "content left out")
        setattr(found, name, span)
        at = span[1] if span else at
    calls = message.get("tool_calls") or []
    found.calls = _find_calls(full, calls, at, limit, opens_by)
    if calls and found.calls is None:
        found.differences.append("tool calls left out or re-ordered")
    return found


def locate_parts(
    full: str, start: int, limit: int, message: dict[str, Any], end_of_turn: re.Pattern, added: re.Pattern | None
) -> TurnParts | None:
    """The parts of the assistant turn ``message`` rendered in ``full`` from ``start`` (its generation prompt's
    end) and before ``limit`` (the next assistant turn's start). ``end_of_turn`` matches the special tokens a turn
    may end with, ``added`` every added token. None when no end-of-turn token follows the turn's text."""
    first_end = end_of_turn.search(full, start, limit)
    found = find_texts(full, start, limit, message, first_end.start() if first_end else limit)
    match = end_of_turn.search(full, found.end(start))
    if match is None or match.start() >= limit:
        return None
    eot = match.start()
    # Cut points: content starts where its own text does (with the spaces before it); tool calls start at the last
    # added token before the first call's name (Qwen3's <tool_call>, not </think>), else right after the content.
    after_reasoning = found.reasoning[1] if found.reasoning else start
    tools_start = None
    if found.calls:
        after_content = found.content[1] if found.content else after_reasoning
        markers = list(added.finditer(full, after_content, found.calls[0])) if added else []
        tools_start = markers[-1].start() if markers else after_content
    head_end = _line_start(full, found.content[0], after_reasoning) if found.content else None
    head_end = next(at for at in (head_end, tools_start, eot) if at is not None)
    head = full[start:head_end]
    parts: list[tuple[str, int, int]] = []
    if found.reasoning:
        parts.append((REASONING, start, head_end))
    elif head.strip():
        empty_think = EMPTY_THINK_BLOCK.fullmatch(head) is not None
        parts.append((EMPTY_THINK if empty_think else CONTENT, start, head_end))
        if empty_think and "reasoning dropped" in found.differences:
            found.differences[found.differences.index("reasoning dropped")] = (
                "reasoning replaced by an empty think block"
            )
    else:
        head_end = start  # whitespace before the content goes with it
    parts.append((CONTENT, head_end, tools_start if tools_start is not None else eot))
    if tools_start is not None:
        parts.append((TOOL_CALLS, tools_start, eot))
    parts.append((END, eot, match.end()))
    return TurnParts([p for p in _merge_blank(parts, full) if p[2] > p[1]], found.differences)


def _line_start(full: str, at: int, floor: int) -> int:
    """``at`` moved back over the spaces and tabs before it (not past ``floor``): cutting a text before a run of
    spaces that follows a newline or a special token leaves its ids unchanged, cutting inside the run does not
    (``\n\n  text``: the Llama 3 / Qwen pre-tokenizer joins the last space to the word)."""
    while at > floor and full[at - 1] in " \t":
        at -= 1
    return at


def _find(full: str, text: str, start: int, limit: int, opens_by: int) -> tuple[int, int] | None:
    """``text``'s span in ``full[start:limit]``, if it starts by ``opens_by``."""
    i = full.find(text, start, limit) if text else -1
    return (i, i + len(text)) if 0 <= i <= opens_by else None


def _find_calls(
    full: str, calls: list[dict[str, Any]], start: int, limit: int, opens_by: int
) -> tuple[int, int] | None:
    """The span from the first call's name to the last call's name, each found after the one before (so a
    re-ordered or missing call is None)."""
    first, at = None, start
    for call in calls:
        name = str(tool_name(call))
        found = _find(full, f'"{name}"', at, limit, opens_by) or _find(full, name, at, limit, opens_by)
        if found is None:
            return None
        first = found[0] if first is None else first
        at = found[1]
    return (first, at) if first is not None else None


def _merge_blank(parts: list[tuple[str, int, int]], full: str) -> list[tuple[str, int, int]]:
    """A content part of whitespace only (between ``</think>`` and ``<tool_call>``) joins the part before it."""
    merged: list[tuple[str, int, int]] = []
    for kind, a, b in parts:
        if kind == CONTENT and merged and b > a and not full[a:b].strip():
            merged[-1] = (merged[-1][0], merged[-1][1], b)
        else:
            merged.append((kind, a, b))
    return merged
