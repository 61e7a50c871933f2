"""Reasoning and tool-call rows: what is read (and refused, naming file, row and key), sharegpt's function calls,
``data.columns`` for tools, the audit's part shares and findings, and the preview's marks — on the real Qwen3
tokenizer and the bundled demo set."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from test_reasoning_tools import WEATHER, call

from kotune.config import DataConfig
from kotune.data.audit import parts_line
from kotune.data.chat_audit import call_problems
from kotune.data.chat_rows import read_conversation, split_reasoning
from kotune.data.conversations import ChatRenderer
from kotune.data.prepare import prepare, token_kinds_of_rows
from kotune.data.read import DataError

DEMO = ROOT / "data" / "ko-reasoning-tools-demo.jsonl"
DEMO_ROWS = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines()]


def row(messages, **columns):
    return {"messages": messages, "_row": 3, "_source": "chat.jsonl line 4", **columns}


USER = {"role": "user", "content": "서울 날씨?"}


@pytest.mark.parametrize(
    ("messages", "columns", "message"),
    [
        ([{**USER, "tool_calls": [call("get_weather")]}], {}, r"messages\[0\]\.tool_calls is on a user turn"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": "x"}], {}, r"messages\[1\]\.tool_calls holds str"),
        (
            [USER, {"role": "assistant", "tool_calls": [{"arguments": {}}]}],
            {},
            r"messages\[1\]\.tool_calls\[0\] has no function name",
        ),
        ([{**USER, "reasoning_content": "음"}], {}, r"messages\[0\]\.reasoning_content is on a user turn"),
        (
            [USER, {"role": "assistant", "content": "a", "reasoning_content": 3}],
            {},
            r"messages\[1\]\.reasoning_content holds int",
        ),
        ([USER], {"tools": "[{"}, r"column 'tools' is not JSON"),
        ([USER], {"tools": {"name": "x"}}, r"column 'tools' holds dict, expected a list of JSON schemas"),
        ([USER], {"tools": [{"type": "function"}]}, r"tools\[0\] has no function name"),
        (
            [{"role": "robot", "content": "x"}],
            {},
            r"messages\[0\]\.role is 'robot'; use one of system, user, assistant, tool",
        ),
    ],
)
def test_bad_rows_name_file_row_and_key(messages, columns, message):
    with pytest.raises(DataError, match=r"^chat\.jsonl line 4 \(row 3\): " + message):
        read_conversation(row(messages, **columns), "messages", "chat.jsonl")


def test_tool_calls_are_read_into_the_openai_shape():
    flat = {"name": "get_weather", "arguments": '{"city": "서울"}', "id": "c1"}
    conversation = read_conversation(
        row([USER, {"role": "assistant", "content": None, "tool_calls": [flat]}], tools=json.dumps([WEATHER])),
        "messages",
        "x",
    )
    assert conversation.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "서울"}}, "id": "c1"}
        ],
    }
    assert conversation.tools == [WEATHER]


def test_inline_think_splits_like_qwen3():
    assert split_reasoning({"content": "<think>\n생각\n</think>\n\n답"}) == ("생각", "답")
    assert split_reasoning({"content": "답", "reasoning_content": "생각"}) == ("생각", "답")
    assert split_reasoning({"content": "답"}) == ("", "답")


def test_sharegpt_function_calls_render_like_messages(real_tokenizers):
    renderer = ChatRenderer(real_tokenizers("qwen3"), DataConfig())
    messages = [
        USER,
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="서울")]},
        {"role": "tool", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "3도입니다."},
    ]
    sharegpt = [
        {"from": "human", "value": "서울 날씨?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "서울"}}'},
        {"from": "observation", "value": '{"temp": 3}'},
        {"from": "gpt", "value": "3도입니다."},
    ]
    a = renderer.render(row(messages, tools=[WEATHER]), "messages", "x")
    b = renderer.render({"conversations": sharegpt, "tools": [WEATHER], "_row": 3}, "sharegpt", "x")
    assert a.segments == b.segments and a.kinds == b.kinds
    assert "tool_calls" in a.kinds


def test_tool_call_schema_check():
    tools = {"get_weather": WEATHER}
    assert call_problems({"name": "get_weather", "arguments": {"city": "서울"}}, tools) == []
    assert call_problems({"name": "get_weather", "arguments": {}}, tools) == ["get_weather: arguments.city is missing"]
    assert call_problems({"name": "get_weather", "arguments": {"city": 3}}, tools) == [
        "get_weather: arguments.city is integer, expected string"
    ]
    assert call_problems({"name": "get_weather", "arguments": '{"city": '}, tools) == [
        "get_weather: arguments are not a JSON object"
    ]
    assert call_problems({"name": "get_time", "arguments": {}}, tools) == ["get_time: no such tool in the row's tools"]


@pytest.fixture
def qwen3(real_tokenizers):
    return real_tokenizers("qwen3")


def test_demo_audit_reports_parts_and_what_the_template_changes(data_config, qwen3):
    bad = {
        "messages": [
            USER,
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city=3)]},
            {"role": "tool", "content": "{}"},
            {"role": "assistant", "content": "모르겠어요."},
        ],
        "tools": [WEATHER],
    }
    cfg = data_config([*DEMO_ROWS, bad], "data.cutoff_len=1024")
    (report,) = prepare(cfg.data, qwen3).audits
    assert set(report.trained_parts) == {"reasoning", "content", "tool_calls", "end", "empty_think"}
    assert sum(report.trained_parts.values()) == report.trained_tokens
    assert "reasoning" in parts_line(report) and "tool_calls" in parts_line(report)
    findings = {f.code: f for f in report.findings}
    multi_turn = [i for i, r in enumerate(DEMO_ROWS) if sum(m["role"] == "user" for m in r["messages"]) > 1]
    assert findings["rendered_differently"].rows == multi_turn
    assert "reasoning dropped" in findings["rendered_differently"].message
    no_reasoning = [
        i
        for i, r in enumerate([*DEMO_ROWS, bad])
        if not (r["messages"][-1].get("reasoning_content") or "<think>" in r["messages"][-1]["content"])
    ]
    assert findings["empty_think"].rows == no_reasoning and findings["empty_think"].level == "warning"
    assert findings["tool_call_invalid"].rows == [len(DEMO_ROWS)]
    assert "arguments.city is integer" in findings["tool_call_invalid"].message
    assert "reasoning_cut" not in findings


def test_audit_names_rows_whose_reasoning_the_cutoff_cuts(data_config, qwen3):
    long = {"messages": [USER, {"role": "assistant", "reasoning_content": "생각 " * 200, "content": "답"}]}
    short = {"messages": [USER, {"role": "assistant", "reasoning_content": "짧은 생각", "content": "답"}]}
    (report,) = prepare(data_config([short, long], "data.cutoff_len=64").data, qwen3).audits
    assert {f.code: f.rows for f in report.findings}["reasoning_cut"] == [1]


def test_empty_think_masked_is_only_noted(data_config, qwen3):
    cfg = data_config(DEMO_ROWS, "data.drop_empty_think=true", "data.cutoff_len=1024")
    (report,) = prepare(cfg.data, qwen3).audits
    assert "empty_think" not in report.trained_parts
    assert {f.code: f.level for f in report.findings}["empty_think"] == "info"


def test_tools_column_is_mapped_with_data_columns(data_config, qwen3):
    rows = [
        {"messages": DEMO_ROWS[i]["messages"], "functions": DEMO_ROWS[i].get("tools")} for i in range(len(DEMO_ROWS))
    ]
    with_tools = next(i for i, r in enumerate(DEMO_ROWS) if r.get("tools"))
    cfg = data_config(rows, "data.columns={tools: functions}", "data.cutoff_len=1024")
    data = prepare(cfg.data, qwen3)
    example = next(e for e in data.train if e.row == with_tools)
    assert "<tools>" in qwen3.decode(example.input_ids)
    kinds = token_kinds_of_rows(cfg.data, qwen3, [with_tools])[with_tools]
    assert len(kinds) == len(example.input_ids) and "tool_calls" in kinds


def test_preview_marks_reasoning_tool_calls_and_masked_text(qwen3, tmp_path, capsys, monkeypatch):
    from kotune.cli import main

    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    tokenizer_dir = qwen3.name_or_path
    config = ROOT / "examples" / "ko-reasoning-qwen3.yaml"
    tool_row = next(i for i, r in enumerate(DEMO_ROWS) if r.get("tools"))
    tool_rows = tmp_path / "one.jsonl"
    tool_rows.write_text(json.dumps(DEMO_ROWS[tool_row], ensure_ascii=False) + "\n", encoding="utf-8")
    args = [f"model.path={tokenizer_dir}", f"data.path={tool_rows}", "data.val_size=0"]
    assert main(["data", "preview", str(config), *args, "--limit", "1"]) == 0
    shown = capsys.readouterr().out
    assert "reasoning ⟪…⟫, tool calls ⟦…⟧" in shown
    assert "⟪<think>\n" in shown and '⟦<tool_call>\n{"name": "' in shown
    assert "[\n<|im_start|>user\n<tool_response>" in shown  # the tool's result is masked


@pytest.mark.parametrize("base", ["qwen3", "llama3_1"])
def test_prepared_demo_rows_are_the_templates_own_ids(real_tokenizers, data_config, base):
    """Through ``prepare`` (batched encoding, word by word for Llama 3.1's tokenizer): every demo row's ids are the
    chat template's up to its last assistant turn."""
    from pathlib import Path

    from test_reasoning_tools import LLAMA3_1_TOOLS

    tok = real_tokenizers(base)
    template = LLAMA3_1_TOOLS if base == "llama3_1" else None
    # Llama 3.1's template takes one tool call a turn
    rows = [r for r in DEMO_ROWS if base != "llama3_1" or all(len(m.get("tool_calls", [])) < 2 for m in r["messages"])]
    overrides = ["data.cutoff_len=2048"] + ([f"data.chat_template={template}"] if template else [])
    data = prepare(data_config(rows, *overrides).data, tok)
    assert len(data.train) == len(rows)
    text = Path(template).read_text(encoding="utf-8") if template else None
    for example in data.train:
        row = rows[example.row]
        own = tok.apply_chat_template(row["messages"], tools=row.get("tools"), chat_template=text)["input_ids"]
        assert example.input_ids == own[: len(example.input_ids)], example.row
