"""Reasoning traces and tool calls on real tokenizers: the ids are the chat template's own, and the masks of every
option equal an independent reference read off those ids (``reference_encoding.reference_kinds``).

Qwen3's own template (thinking and tools), Meta's Llama 3.1 tool template (``tests/templates``) on the Llama 3.1
tokenizer, and the plain conversations of ``test_conversations`` on the Qwen3, Gemma 3 and Llama 3.1 tokenizers'
own templates (issue 29: assistant content and end-of-turn trained, everything else masked).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from reference_encoding import TurnMarkers, encode_rows, reference_kinds, reference_trained
from test_conversations import CONVERSATIONS

from kotune.config import DataConfig
from kotune.data.conversations import ChatRenderer, token_kinds
from kotune.data.examples import IGNORE

LLAMA3_1_TOOLS = str(Path(__file__).parent / "templates" / "llama3_1_tools.jinja")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "도시의 현재 기온을 알려 준다",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


QWEN3_ROWS = {
    "reasoning_one_turn": [
        {"role": "user", "content": "17 곱하기 3은?"},
        {"role": "assistant", "reasoning_content": "17×3 = 51.", "content": "51입니다."},
    ],
    "inline_think": [
        {"role": "user", "content": "하늘은 왜 파래?"},
        {"role": "assistant", "content": "<think>\n빛의 산란을 말하면 된다.\n</think>\n\n레일리 산란 때문입니다."},
    ],
    "history_reasoning": [
        {"role": "system", "content": "짧게 답해."},
        {"role": "user", "content": "2+2는?"},
        {"role": "assistant", "reasoning_content": "더하면 4.", "content": "4"},
        {"role": "user", "content": "거기에 3을 곱하면?"},
        {"role": "assistant", "reasoning_content": "4×3 = 12.", "content": "12입니다."},
    ],
    "no_reasoning_last": [
        {"role": "user", "content": "안녕?"},
        {"role": "assistant", "content": "안녕하세요!"},
    ],
    "tool_use": [
        {"role": "user", "content": "서울 날씨 알려 줘"},
        {
            "role": "assistant",
            "reasoning_content": "날씨 도구를 불러야 한다.",
            "content": "",
            "tool_calls": [call("get_weather", city="서울")],
        },
        {"role": "tool", "content": '{"temp": 3}'},
        {"role": "assistant", "reasoning_content": "3도라고 한다.", "content": "서울은 지금 3도입니다."},
    ],
    "two_calls_with_content_then_user": [
        {"role": "system", "content": "너는 비서야."},
        {"role": "user", "content": "서울과 부산 날씨?"},
        {
            "role": "assistant",
            "content": "두 도시를 확인할게요.",
            "tool_calls": [call("get_weather", city="서울"), call("get_weather", city="부산")],
        },
        {"role": "tool", "content": '{"temp": 3}'},
        {"role": "tool", "content": '{"temp": 9}'},
        {"role": "assistant", "reasoning_content": "서울 3도, 부산 9도.", "content": "서울 3도, 부산 9도입니다."},
        {"role": "user", "content": "고마워"},
        {"role": "assistant", "content": "천만에요."},
    ],
}

QWEN3 = TurnMarkers("<|im_start|>assistant\n", "<|im_end|>")
LLAMA3 = TurnMarkers("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
GEMMA3 = TurnMarkers("<start_of_turn>model\n", "<end_of_turn>")
DEEPSEEK_V3 = TurnMarkers("<｜Assistant｜>", "<｜end▁of▁sentence｜>")

OPTIONS = {
    "default": {},
    "last_turn_only": {"last_turn_only": True},
    "mask_history_reasoning": {"mask_history_reasoning": True},
    "drop_empty_think": {"drop_empty_think": True},
}


def render(tokenizer, messages, tools=None, **options):
    row = {"messages": messages, "_row": 0, "_source": "test"}
    if tools:
        row["tools"] = tools
    return ChatRenderer(tokenizer, DataConfig(**options)).render(row, "messages", "test")


def check_exact(tokenizer, messages, markers, tools=None, template=None, **options):
    """Our ids are the template's ids up to the last assistant turn's end; labels equal the reference's; per-token
    kinds equal the reference's. Returns the rendered row and the example."""
    rendered = render(tokenizer, messages, tools, chat_template=template, **options)
    (example,), _ = encode_rows(tokenizer, [rendered], 1 << 16)
    text = Path(template).read_text(encoding="utf-8") if template else None
    own = tokenizer.apply_chat_template(messages, tools=tools, chat_template=text, tokenize=True)["input_ids"]
    n = len(example.input_ids)
    assert example.input_ids == own[:n]
    kinds = reference_kinds(tokenizer, own, markers)[:n]
    assert [label != IGNORE for label in example.labels] == reference_trained(kinds, **options)
    ours = token_kinds(rendered, tokenizer)
    assert [k if r else "prompt" for k, r in zip(ours, kinds, strict=True)] == ours  # turn kinds only in turns
    assert [r[1] if r else "prompt" for r in kinds] == ours
    return rendered, example


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("name", sorted(QWEN3_ROWS))
def test_qwen3_thinking_template_masks_are_exact(real_tokenizers, name, option):
    messages = QWEN3_ROWS[name]
    tools = [WEATHER] if any(m.get("tool_calls") for m in messages) else None
    check_exact(real_tokenizers("qwen3"), messages, QWEN3, tools, **OPTIONS[option])


def test_qwen3_reports_history_reasoning_it_drops_and_trains_what_it_renders(real_tokenizers):
    tok = real_tokenizers("qwen3")
    rendered, example = check_exact(tok, QWEN3_ROWS["history_reasoning"], QWEN3)
    assert rendered.notes == ("messages[2]: reasoning dropped",)
    trained = tok.decode([t for t in example.labels if t != IGNORE])
    assert trained == "4<|im_end|><think>\n4×3 = 12.\n</think>\n\n12입니다.<|im_end|>"


def test_qwen3_tool_turn_parts(real_tokenizers):
    tok = real_tokenizers("qwen3")
    rendered, _ = check_exact(tok, QWEN3_ROWS["tool_use"], QWEN3, [WEATHER])
    parts = [(kind, text) for (text, _), kind in zip(rendered.segments, rendered.kinds, strict=True)]
    assert [k for k, _ in parts if k != "prompt"] == ["reasoning", "tool_calls", "end", "reasoning", "content", "end"]
    assert dict(parts[1:3]) == {
        "reasoning": "<think>\n날씨 도구를 불러야 한다.\n</think>\n\n",
        "tool_calls": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "서울"}}\n</tool_call>',
    }
    tool_result = next(text for kind, text in parts if kind == "prompt" and "tool_response" in text)
    assert '{"temp": 3}' in tool_result  # the tool's result is context, never trained


def test_empty_think_block_is_kept_or_dropped(real_tokenizers):
    tok = real_tokenizers("qwen3")
    for drop in (False, True):
        rendered, example = check_exact(tok, QWEN3_ROWS["no_reasoning_last"], QWEN3, drop_empty_think=drop)
        trained = tok.decode([t for t in example.labels if t != IGNORE])
        assert trained == ("" if drop else "<think>\n\n</think>\n\n") + "안녕하세요!<|im_end|>"


LLAMA3_1_ROWS = {
    "tool_call_then_answer": [
        {"role": "system", "content": "너는 날씨 비서야."},
        {"role": "user", "content": "서울 날씨 알려 줘"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city="서울")]},
        {"role": "tool", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "서울은 지금 3도입니다."},
        {"role": "user", "content": "고마워"},
        {"role": "assistant", "content": "천만에요."},
    ],
    "tool_call_last": [
        {"role": "user", "content": "부산 날씨?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="부산")]},
    ],
}


@pytest.mark.parametrize("option", ["default", "last_turn_only"])
@pytest.mark.parametrize("name", sorted(LLAMA3_1_ROWS))
def test_llama3_1_tool_template_masks_are_exact(real_tokenizers, name, option):
    tok = real_tokenizers("llama3_1")
    messages = [{**m, "content": m["content"] or ""} for m in LLAMA3_1_ROWS[name]]
    rendered, example = check_exact(tok, messages, LLAMA3, [WEATHER], LLAMA3_1_TOOLS, **OPTIONS[option])
    calls = [text for (text, _), kind in zip(rendered.segments, rendered.kinds, strict=True) if kind == "tool_calls"]
    assert calls[0].startswith('{"name": "get_weather", "parameters": {"city": ')
    assert rendered.notes == ()


def test_llama3_1_reports_content_it_leaves_out_of_a_tool_call_turn(real_tokenizers):
    messages = [*LLAMA3_1_ROWS["tool_call_last"]]
    messages[1] = {**messages[1], "content": "확인해 볼게요."}
    rendered = render(real_tokenizers("llama3_1"), messages, [WEATHER], chat_template=LLAMA3_1_TOOLS)
    assert rendered.notes == ("messages[1]: content left out",)


OWN_TEMPLATES = {"qwen3": QWEN3, "gemma3": GEMMA3, "llama3_1": LLAMA3, "deepseek_v3": DEEPSEEK_V3}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("base", sorted(OWN_TEMPLATES))
def test_own_templates_train_exactly_assistant_content_and_end_of_turn(real_tokenizers, base, name):
    tok, messages = real_tokenizers(base), CONVERSATIONS[name]
    end = OWN_TEMPLATES[base].closer
    # Qwen3 inserts an empty think block into the last turn; masked here, so only content and end-of-turn train
    _, example = check_exact(tok, messages, OWN_TEMPLATES[base], drop_empty_think=True)
    # Gemma 3 and Llama 3.1 trim content; Qwen3 strips only the newlines in front of the last turn's content;
    # DeepSeek V3 renders content as it is
    trim = {"qwen3": lambda text: text.lstrip("\n"), "deepseek_v3": lambda text: text}.get(base, str.strip)
    expected = [trim(m["content"]) + end for m in messages if m["role"] == "assistant"]
    assert tok.decode([t for t in example.labels if t != IGNORE]) == "".join(expected)


@pytest.mark.parametrize("answer", ["레일리 산란 때문입니다.", "  들여 쓴 답", '"인용"으로 시작'])
def test_inline_think_on_a_template_without_think_tokens(real_tokenizers, answer):
    """Llama 3.1's own template renders the content as it is: the think block is plain text, cut from the answer
    where re-encoding keeps the template's ids (after the newlines that follow ``</think>``)."""
    tok = real_tokenizers("llama3_1")
    content = f"<think>\n빛의 산란을 말하면 된다.\n</think>\n\n{answer}"
    messages = [{"role": "user", "content": "하늘은 왜 파래?"}, {"role": "assistant", "content": content}]
    rendered = render(tok, messages)
    (example,), _ = encode_rows(tok, [rendered], 4096)
    own = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert example.input_ids == own
    parts = {kind: text for (text, _), kind in zip(rendered.segments, rendered.kinds, strict=True)}
    assert parts["reasoning"] == "<think>\n빛의 산란을 말하면 된다.\n</think>\n\n"
    assert parts["content"] == answer and rendered.notes == ()  # spaces before the answer go with it
    assert tok.decode([t for t in example.labels if t != IGNORE]) == content.strip() + "<|eot_id|>"
