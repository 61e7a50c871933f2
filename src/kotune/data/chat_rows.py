"""Conversation rows read into the message shape chat templates take (transformers' ``apply_chat_template``).

A ``messages`` row is ``[{role, content}]`` with roles system, user, assistant and tool; an assistant turn may carry
``reasoning_content`` (or an inline ``<think>…</think>`` at the start of its content) and ``tool_calls`` in the
OpenAI shape (``[{type: function, function: {name, arguments}}]``; a flat ``{name, arguments}`` is accepted too).
A row's ``tools`` column is the JSON-schema list of functions the template shows the model. sharegpt rows
(``[{from, value}]``) map ``function_call`` turns (their value: a JSON call or list of calls) to assistant tool
calls and ``observation`` turns to tool results. Bad structure is a ``DataError`` naming the file, row and key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kotune.data.formats import SkipRow
from kotune.data.read import DataError

ROLES = ("system", "user", "assistant", "tool")
"""Roles a ``messages`` turn may have."""

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
"""sharegpt ``from`` values and the chat roles they stand for (``function_call``: an assistant turn of tool calls)."""

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
"""Tags of a reasoning block inline in an assistant's content (Qwen3, DeepSeek-R1, EXAONE 4 write these)."""

TURN_KEYS = ("reasoning_content", "tool_calls", "tool_call_id", "name")
"""Message keys besides role and content that are passed on to the chat template when a turn has them."""


@dataclass(frozen=True)
class Conversation:
    """A row's turns as the chat template takes them, and the row's tool definitions."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    source: str
    """``file (row N)``, for messages that point at the row."""


def split_reasoning(message: dict[str, Any]) -> tuple[str, str]:
    """An assistant turn's (reasoning, answer): ``reasoning_content`` and the content, or the inline think block
    cut off the content the way Qwen3's template cuts it (reasoning ``""`` when there is none)."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if THINK_CLOSE in content:
        head, _, answer = content.rpartition(THINK_CLOSE)
        return head.split(THINK_OPEN)[-1].strip("\n"), answer.lstrip("\n")
    return "", content


def tool_name(tool: dict[str, Any]) -> str | None:
    """The function name of a tool definition or of a tool call (OpenAI shape or flat)."""
    inner = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = inner.get("name")
    return name if isinstance(name, str) else None


def read_conversation(row: dict[str, Any], fmt: str, where: str) -> Conversation:
    """A ``messages`` or ``sharegpt`` row as a ``Conversation``; rows that cannot train raise ``SkipRow``."""
    key = "messages" if fmt == "messages" else "conversations"
    source = f"{row.get('_source', where)} (row {row['_row']})"
    turns = row.get(key)
    if turns is None:
        raise SkipRow(f"null {key}")
    if not isinstance(turns, list):
        raise DataError(f"{source}: column '{key}' holds {type(turns).__name__}, expected a list of turns")
    read = _read_message if fmt == "messages" else _read_sharegpt_turn
    messages = [read(turn, f"{key}[{i}]", source) for i, turn in enumerate(turns)]
    return Conversation(messages, row_tools(row, where), source)


def row_tools(row: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    """A row's ``tools`` column read and checked (None when it has none)."""
    return _read_tools(row.get("tools"), f"{row.get('_source', where)} (row {row['_row']})")


def _read_message(turn: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise DataError(f"{source}: {where} is {type(turn).__name__}, expected {{role, content}}")
    role = turn.get("role")
    if role not in ROLES:
        raise DataError(f"{source}: {where}.role is {role!r}; use one of {', '.join(ROLES)}")
    message: dict[str, Any] = {"role": role}
    calls = turn.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise DataError(f"{source}: {where}.tool_calls is on a {role} turn; only assistant turns call tools")
        message["tool_calls"] = _read_tool_calls(calls, f"{where}.tool_calls", source)
    message["content"] = _read_content(turn.get("content"), f"{where}.content", source, bool(calls))
    for extra in ("reasoning_content", "tool_call_id", "name"):
        value = turn.get(extra)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{source}: {where}.{extra} holds {type(value).__name__}, expected text")
        if extra == "reasoning_content" and role != "assistant":
            raise DataError(f"{source}: {where}.reasoning_content is on a {role} turn; only assistant turns reason")
        message[extra] = value
    return message


def _read_sharegpt_turn(turn: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise DataError(f"{source}: {where} is {type(turn).__name__}, expected {{from, value}}")
    speaker = turn.get("from")
    role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        raise DataError(f"{source}: {where}.from is {speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}")
    value = _read_content(turn.get("value"), f"{where}.value", source, False)
    if speaker != "function_call":
        return {"role": role, "content": value}
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: {where}.value of a function_call turn is not JSON ({exc.msg})") from None
    calls = calls if isinstance(calls, list) else [calls]
    return {"role": "assistant", "content": "", "tool_calls": _read_tool_calls(calls, f"{where}.value", source)}


def _read_content(value: Any, where: str, source: str, calls_tools: bool) -> str:
    if value is None:
        if calls_tools:  # OpenAI's shape: a turn of tool calls has no content
            return ""
        raise SkipRow("null content in a turn")
    if not isinstance(value, str):
        raise DataError(f"{source}: {where} holds {type(value).__name__}, expected text")
    return value


def _read_tool_calls(calls: Any, where: str, source: str) -> list[dict[str, Any]]:
    """Tool calls in the OpenAI shape; string arguments that hold a JSON object become that object (templates
    render objects with ``tojson``), other strings stay as they are for the audit to report."""
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{source}: {where} holds {type(calls).__name__}, expected a non-empty list of calls")
    read = []
    for i, call in enumerate(calls):
        inner = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
            raise DataError(
                f"{source}: {where}[{i}] has no function name; expected "
                '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
            )
        arguments = inner.get("arguments", {})
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                parsed = None
            arguments = parsed if isinstance(parsed, dict) else arguments
        normal = {"type": "function", "function": {"name": inner["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            normal["id"] = call["id"]
        read.append(normal)
    return read


def _read_tools(tools: Any, source: str) -> list[dict[str, Any]] | None:
    """The row's tool definitions (a JSON string is parsed: LLaMA-Factory's sharegpt files store them so)."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: column 'tools' is not JSON ({exc.msg})") from None
    if not isinstance(tools, list):
        raise DataError(f"{source}: column 'tools' holds {type(tools).__name__}, expected a list of JSON schemas")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool_name(tool) is None:
            raise DataError(
                f"{source}: tools[{i}] has no function name; expected "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
            )
    return tools
