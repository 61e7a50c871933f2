"""Replies after training: reasoning, answer and tool calls read off a generated text; the chat view that shows
reasoning apart (or hides it), streamed piece by piece; generate's output fields; eval scoring the answer alone."""

from __future__ import annotations

import json
import re

import pytest

from kotune.commands.chat import show_reply
from kotune.commands.generate import output_line
from kotune.evaluation.metrics import score_reply
from kotune.inference.reply import ReasoningView, assistant_message, parse_reply

QWEN3_REPLY = (
    "<think>\n도구를 불러야 한다.\n</think>\n\n확인할게요.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call>'
)
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "서울"}}}


def test_parse_qwen3_reply_with_reasoning_and_a_tool_call():
    reply = parse_reply(QWEN3_REPLY)
    assert reply.reasoning == "도구를 불러야 한다."
    assert reply.answer == "확인할게요."
    assert reply.tool_calls == [WEATHER_CALL]


@pytest.mark.parametrize(
    ("text", "reasoning", "answer", "calls"),
    [
        ("그냥 답입니다.", None, "그냥 답입니다.", []),
        ("생각만 하고\n</think>\n\n답", "생각만 하고", "답", []),  # <think> was in the prompt (DeepSeek-R1)
        ('{"name": "get_weather", "parameters": {"city": "서울"}}', None, "", [WEATHER_CALL]),  # Llama 3.1
        ("<tool_call>\n{not json}\n</tool_call>", None, "<tool_call>\n{not json}\n</tool_call>", []),
        ('{"a": 1}', None, '{"a": 1}', []),  # a JSON answer that is no call
    ],
)
def test_parse_reply_shapes(text, reasoning, answer, calls):
    reply = parse_reply(text)
    assert (reply.reasoning, reply.answer, reply.tool_calls) == (reasoning, answer, calls)


def test_history_keeps_reasoning_apart_and_plain_replies_as_they_came():
    assert assistant_message(" 그대로 ") == {"role": "assistant", "content": " 그대로 "}
    assert assistant_message(QWEN3_REPLY) == {
        "role": "assistant",
        "content": "확인할게요.",
        "reasoning_content": "도구를 불러야 한다.",
        "tool_calls": [WEATHER_CALL],
    }


def stream(text: str, size: int):
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 3, 50])
def test_reasoning_view_splits_a_stream_whatever_the_pieces(size):
    view = ReasoningView()
    pieces = [p for piece in stream("<think>\n먼저 생각.\n</think>\n\n답입니다.", size) for p in view.push(piece)]
    joined = {kind: "".join(t for k, t in pieces if k == kind) for kind in ("reasoning", "answer")}
    assert joined == {"reasoning": "먼저 생각.\n", "answer": "답입니다."}
    assert [k for k, _ in pieces] == sorted([k for k, _ in pieces], key=["reasoning", "answer"].index)
    plain = [p for piece in stream("<thi가 아닌 답", size) for p in ReasoningView().push(piece)]
    assert "".join(t for _, t in plain).endswith("답") and {k for k, _ in plain} == {"answer"}


def test_chat_shows_reasoning_apart_or_hides_it(capsys):
    text = "<think>\n먼저 생각.\n</think>\n\n답입니다."
    show_reply(iter(stream(text, 2)), hide_reasoning=False, color=False)
    assert capsys.readouterr().out == "(생각) 먼저 생각.\n\n(답) 답입니다."
    show_reply(iter(stream(text, 2)), hide_reasoning=True, color=False)
    assert capsys.readouterr().out == "답입니다."
    show_reply(iter(stream(text, 2)), hide_reasoning=False, color=True)
    shown = capsys.readouterr().out
    assert shown.startswith("\x1b[2m먼저") and shown.endswith("\x1b[0m\n\n답입니다.")
    assert re.sub(r"\x1b\[\d+m", "", shown) == "먼저 생각.\n\n\n답입니다."


def test_generate_writes_reasoning_and_tool_calls():
    record = json.loads(output_line({"_row": 0, "messages": []}, "p", "m", QWEN3_REPLY, True, {}))
    assert record["generated"] == QWEN3_REPLY
    assert record["reasoning"] == "도구를 불러야 한다." and record["tool_calls"] == [WEATHER_CALL]
    plain = json.loads(output_line({"_row": 1}, "p", "m", "답", True, {}))
    assert plain["reasoning"] is None and plain["tool_calls"] == []


def test_eval_scores_the_answer_without_its_reasoning():
    score = score_reply(
        "<think>\n금성일까 화성일까\n</think>\n\n금성입니다.", True, 9, "가장 뜨거운 행성은?", "금성입니다."
    )
    assert score.exact and score.chrf == 100.0
