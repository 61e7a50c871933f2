"""Parts of one assistant turn located in hand-written template text: the cuts, and what the template renders
differently from the data."""

from __future__ import annotations

import re

from kotune.data.turn_parts import locate_parts

EOT = re.compile(re.escape("<eot>"))
ADDED = re.compile("|".join(re.escape(t) for t in ("<eot>", "<think>", "</think>", "<tool_call>", "</tool_call>")))
PROMPT = "<user>질문<eot><assistant>\n"


def parts(turn_text: str, message: dict):
    full = PROMPT + turn_text + "<user>다음<eot>"
    found = locate_parts(full, len(PROMPT), len(full), message, EOT, ADDED)
    return [(kind, full[a:b]) for kind, a, b in found.parts], found.differences


def call(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": {}}}


def test_reasoning_content_tool_calls_and_end():
    message = {"reasoning_content": "생각", "content": "답", "tool_calls": [call("a"), call("b")]}
    text = (
        '<think>\n생각\n</think>\n\n답\n<tool_call>{"name": "a"}</tool_call>\n<tool_call>{"name": "b"}</tool_call><eot>'
    )
    assert parts(text, message) == (
        [
            ("reasoning", "<think>\n생각\n</think>\n\n"),
            ("content", "답\n"),
            ("tool_calls", '<tool_call>{"name": "a"}</tool_call>\n<tool_call>{"name": "b"}</tool_call>'),
            ("end", "<eot>"),
        ],
        [],
    )


def test_re_ordered_tool_calls_are_reported():
    message = {"content": "", "tool_calls": [call("a"), call("b")]}
    text = '<tool_call>{"name": "b"}</tool_call><tool_call>{"name": "a"}</tool_call><eot>'
    kinds, differences = parts(text, message)
    assert differences == ["tool calls left out or re-ordered"]
    assert kinds[-1] == ("end", "<eot>")


def test_reasoning_replaced_by_an_empty_think_block_is_reported():
    found, differences = parts("<think>\n\n</think>\n\n답<eot>", {"reasoning_content": "생각", "content": "답"})
    assert found == [("empty_think", "<think>\n\n</think>\n\n"), ("content", "답"), ("end", "<eot>")]
    assert differences == ["reasoning replaced by an empty think block"]


def test_content_holding_the_end_of_turn_text_is_one_turn():
    found, differences = parts("a <eot> b<eot>", {"content": "a <eot> b"})
    assert found == [("content", "a <eot> b"), ("end", "<eot>")] and differences == []


def test_content_the_template_leaves_out_is_reported_and_the_turn_still_ends():
    found, differences = parts("<eot>", {"content": "사라진 답"})
    assert found == [("end", "<eot>")] and differences == ["content left out"]


def test_no_end_of_turn_token_is_none():
    full = PROMPT + "답"
    assert locate_parts(full, len(PROMPT), len(full), {"content": "답"}, EOT, ADDED) is None
