"""A generated reply cut into its reasoning, its answer and its tool calls, as chat templates write them.

Reasoning is the text up to ``</think>`` (a leading ``<think>`` dropped: templates such as DeepSeek-R1's put it in
the prompt). Tool calls are ``<tool_call>{json}</tool_call>`` blocks (Qwen3, Hermes), or a whole answer that is one
JSON object with a ``name`` and ``parameters`` / ``arguments`` (Llama 3.1's custom tool calls). A block whose JSON
does not parse stays in the answer, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from kotune.data.chat_rows import THINK_CLOSE, THINK_OPEN

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Reply:
    reasoning: str | None
    """The think block's text (None when the reply has none)."""
    answer: str
    """The reply without its reasoning and tool calls."""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Calls in the OpenAI shape: ``{type: function, function: {name, arguments}}``."""


def parse_reply(text: str) -> Reply:
    """``text`` (a decoded reply, special tokens dropped) as reasoning, answer and tool calls."""
    reasoning = None
    if THINK_CLOSE in text:
        head, _, text = text.partition(THINK_CLOSE)
        reasoning = head.split(THINK_OPEN, 1)[-1].strip()
    calls = []

    def take(match: re.Match) -> str:
        call = _as_call(match.group(1))
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    answer = TOOL_CALL_BLOCK.sub(take, text).strip()
    whole = _as_call(answer) if not calls and answer.startswith("{") else None
    if whole is not None:
        calls, answer = [whole], ""
    return Reply(reasoning, answer, calls)


def _as_call(text: str) -> dict[str, Any] | None:
    """A JSON object with a string ``name`` and ``arguments`` / ``parameters`` as an OpenAI-shaped call."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return {"type": "function", "function": {"name": value["name"], "arguments": arguments}}


def assistant_message(text: str) -> dict[str, Any]:
    """A reply as the assistant turn of a conversation's history: its reasoning and tool calls apart (templates
    render them their own way; Qwen3 drops a history turn's reasoning), else the text as it came."""
    reply = parse_reply(text)
    if reply.reasoning is None and not reply.tool_calls:
        return {"role": "assistant", "content": text}
    message: dict[str, Any] = {"role": "assistant", "content": reply.answer}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return message


class ReasoningView:
    """A streamed reply's text pieces as ``(kind, text)``: ``reasoning`` inside a leading ``<think>…</think>``
    (tags not shown), ``answer`` after it (newlines after ``</think>`` dropped) or when there is no think block.
    A piece that may be the start of a tag is held back until the next one tells."""

    def __init__(self):
        self.text = ""
        self.shown = {"reasoning": 0, "answer": 0}

    def push(self, piece: str) -> list[tuple[str, str]]:
        self.text += piece
        out = []
        for kind, part in zip(("reasoning", "answer"), _split_stream(self.text), strict=True):
            if len(part) > self.shown[kind]:
                out.append((kind, part[self.shown[kind] :]))
                self.shown[kind] = len(part)
        return out


def _split_stream(text: str) -> tuple[str, str]:
    """(reasoning so far, answer so far) of a reply that is still coming."""
    start = text.lstrip()
    if not start.startswith(THINK_OPEN):
        return ("", "") if THINK_OPEN.startswith(start) and start else ("", text)
    inside = start[len(THINK_OPEN) :]
    if THINK_CLOSE in inside:
        reasoning, _, answer = inside.partition(THINK_CLOSE)
        return reasoning.lstrip("\n"), answer.lstrip("\n")
    held = next((n for n in range(len(THINK_CLOSE) - 1, 0, -1) if inside.endswith(THINK_CLOSE[:n])), 0)
    return inside[: len(inside) - held].lstrip("\n"), ""
