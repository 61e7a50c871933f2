"""The chat template written into merged and pushed models renders exactly the prompt kotune trained with: the same
ids as kotune's training encoding, with and without input, for the built-in templates and a tricky YAML one."""

from __future__ import annotations

import pytest
from reference_encoding import encode_rows

from kotune.data.examples import IGNORE
from kotune.data.formats import render_alpaca
from kotune.data.templates import ALPACA, KO_ALPACA, Template, chat_template

TRICKY = Template(
    name="tricky",
    prompt_input='{{{{braces}}}} "quotes" \\back\\slash 😊 {input}\n  {instruction}\t{{% raw %}}\n',
    prompt_no_input="  leading spaces {{{{x}}}}\n{instruction} }}}} %}} #}}",
)
"""Jinja's own syntax, quotes, backslashes, an emoji, spaces before a line, a prompt ending in its placeholder."""

ROWS = [
    {"_row": 0, "instruction": "다음 문장을 요약하세요 {x}", "input": '"따옴표"로 시작', "output": "요약입니다."},
    {"_row": 1, "instruction": "하늘은 왜 파란가요?", "input": "", "output": "\n산란 때문입니다."},
    {"_row": 2, "instruction": "공백 입력", "input": "  \n", "output": "네."},
    {"_row": 3, "instruction": "{% if %} 그리고 }}", "output": "없음"},
]


def messages_of(row: dict) -> list[dict]:
    """The documented convention: the user message is the instruction, its ``input`` key the input."""
    message = {"role": "user", "content": row["instruction"]}
    if "input" in row:
        message["input"] = row["input"]
    return [message]


def rendered_ids(tokenizer, messages, template: str, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.compat("transformers", "tokenizers")
@pytest.mark.parametrize("template", [KO_ALPACA, ALPACA, TRICKY], ids=lambda t: t.name)
def test_the_chat_template_gives_the_training_prompt_ids(template, llama3_train_tokenizer):
    tokenizer = llama3_train_tokenizer
    jinja = chat_template(template, tokenizer.bos_token)
    rendered = [render_alpaca(r, template, False, "test") for r in ROWS]
    examples, _ = encode_rows(tokenizer, rendered, cutoff_len=1024)
    for row, example in zip(ROWS, examples, strict=True):
        prompt_ids = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE]
        assert rendered_ids(tokenizer, messages_of(row), jinja, add_generation_prompt=True) == prompt_ids, row
        # without the generation prompt: the prompt up to its last placeholder, the text after it left out
        text = tokenizer.apply_chat_template(messages_of(row), chat_template=jinja, tokenize=False)
        full = tokenizer.decode(prompt_ids)
        assert full.startswith(text) and len(full) > len(text)


def test_no_bos_in_front_when_the_tokenizer_adds_none(llama3_train_tokenizer):
    jinja = chat_template(KO_ALPACA, None)
    text = llama3_train_tokenizer.apply_chat_template(messages_of(ROWS[1]), chat_template=jinja, tokenize=False)
    assert text == KO_ALPACA.format(ROWS[1]["instruction"]).removesuffix("\n###답변:")


def test_a_system_turn_is_refused(llama3_train_tokenizer):
    jinja = chat_template(KO_ALPACA, None)
    with pytest.raises(Exception, match="user and assistant turns only"):
        llama3_train_tokenizer.apply_chat_template([{"role": "system", "content": "x"}], chat_template=jinja)


def test_a_raw_prompt_run_renders_the_message_as_it_is(llama3_train_tokenizer):
    from kotune.data.templates import RAW_PROMPT

    jinja = chat_template(RAW_PROMPT, llama3_train_tokenizer.bos_token)
    message = {"role": "user", "content": "### 질문: {x} }}\n답:"}
    for add_generation_prompt in (True, False):
        text = llama3_train_tokenizer.apply_chat_template(
            [message], chat_template=jinja, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert text == "<|begin_of_text|>" + message["content"]
