"""Conversations: exact assistant-only masks against the real Llama-3 chat template, sharegpt, the plain template,
all-turns training, rows that are skipped or refused, and an end-to-end CPU training run."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl
from reference_encoding import encode_rows

from kotune.config import DataConfig
from kotune.data.conversations import PLAIN_CHAT_TEMPLATE, ChatRenderer
from kotune.data.examples import IGNORE
from kotune.data.prepare import prepare
from kotune.data.read import DataError
from kotune.data.templates import TemplateError

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요!"}],
    "system_and_two_turns": [
        {"role": "system", "content": "너는 친절한 비서야."},
        {"role": "user", "content": "2+2는?"},
        {"role": "assistant", "content": "4입니다."},
        {"role": "user", "content": "고마워"},
        {"role": "assistant", "content": "천만에요. 또 물어보세요!"},
    ],
    "whitespace_around_content": [
        {"role": "user", "content": "  공백  "},
        {"role": "assistant", "content": "\n\n  앞뒤 공백과 줄바꿈\n"},
    ],
    "multiline_and_markup": [
        {"role": "user", "content": "목록을 써 줘"},
        {"role": "assistant", "content": '- 사과\n- 배\n\n```json\n{"a": 1}\n```'},
        {"role": "user", "content": "영어로?"},
        {"role": "assistant", "content": "- apple\n- pear"},
    ],
    "ends_with_user_turn": [
        {"role": "user", "content": "질문"},
        {"role": "assistant", "content": "답"},
        {"role": "user", "content": "아무도 답하지 않은 질문"},
    ],
}


def render_conversation(row: dict, fmt: str, tokenizer, data_cfg: DataConfig, where: str):
    """One conversation row as segments, as ``prepare`` renders it (one ``ChatRenderer`` per row here)."""
    return ChatRenderer(tokenizer, data_cfg).render(row, fmt, where)


def row(messages, i=0, fmt="messages"):
    return {fmt: messages, "_row": i, "_source": f"test line {i + 1}"}


def encode_one(tokenizer, messages, data_cfg=None):
    rendered = render_conversation(row(messages), "messages", tokenizer, data_cfg or DataConfig(), "test")
    (example,), stats = encode_rows(tokenizer, [rendered], 4096)
    return example


def reference_mask(tokenizer, ids: list[int]) -> list[bool]:
    """Trained positions read off the template's own ids: after each assistant header, up to and with <|eot_id|>."""
    header = tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"])
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    mask, inside = [], False
    for i, token in enumerate(ids):
        mask.append(inside)
        if ids[max(0, i - 3) : i + 1] == header:
            inside = True
        elif token == eot and inside:
            inside = False
    return mask


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_llama3_masks_are_exactly_the_assistant_turns(llama3_tokenizer, name):
    tok, messages = llama3_tokenizer, CONVERSATIONS[name]
    example = encode_one(tok, messages)
    reference = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    n = len(example.input_ids)
    # The same ids as the tokenizer's own chat template, up to the end of the last assistant turn.
    assert example.input_ids == reference[:n]
    assert tok.decode(reference[n:]).startswith("<|start_header_id|>")
    assert example.input_ids.count(tok.bos_token_id) == 1
    trained = [label != IGNORE for label in example.labels]
    assert trained == reference_mask(tok, reference)[:n]
    assert all(label == t for label, t in zip(example.labels, example.input_ids, strict=True) if label != IGNORE)
    expected = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
    assert tok.decode([t for t in example.labels if t != IGNORE]) == "".join(expected)


def test_sharegpt_renders_like_messages(llama3_tokenizer):
    messages = CONVERSATIONS["system_and_two_turns"]
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": roles[m["role"]], "value": m["content"]} for m in messages]
    a = render_conversation(row(messages), "messages", llama3_tokenizer, DataConfig(), "t")
    b = render_conversation(row(sharegpt, fmt="conversations"), "sharegpt", llama3_tokenizer, DataConfig(), "t")
    assert a == b


def test_train_on_all_turns_trains_everything_after_bos(llama3_tokenizer):
    example = encode_one(llama3_tokenizer, CONVERSATIONS["system_and_two_turns"], DataConfig(train_on_all_turns=True))
    assert example.labels[0] == IGNORE and example.input_ids[0] == llama3_tokenizer.bos_token_id
    assert example.labels[1:] == example.input_ids[1:]


def test_plain_template_ends_assistant_turns_with_eos(llama3_tokenizer):
    tok = llama3_tokenizer
    messages = CONVERSATIONS["system_and_two_turns"]
    example = encode_one(tok, messages, DataConfig(chat_template="plain"))
    spans, current = [], []
    for label in [*example.labels, IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(s) for s in spans] == [a + tok.eos_token for a in answers]
    specials = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert {t for t in example.input_ids if t in specials} <= {tok.bos_token_id, tok.eos_token_id}
    assert "### 질문:\n2+2는?\n\n### 답변:\n" in tok.decode(example.input_ids)


def test_chat_template_from_a_file(llama3_tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(PLAIN_CHAT_TEMPLATE, encoding="utf-8")
    messages = CONVERSATIONS["one_turn"]
    from_file = DataConfig(chat_template=str(path))
    builtin = DataConfig(chat_template="plain")
    rendered = [render_conversation(row(messages), "messages", llama3_tokenizer, c, "") for c in (from_file, builtin)]
    assert rendered[0] == rendered[1]


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"role": "robot", "content": "x"}], r"test line 1 \(row 0\): messages\[0\]\.role is 'robot'; use one of"),
        ([{"role": "user", "content": ["x"]}], r"messages\[0\]\.content holds list, expected text"),
        (["just text"], r"messages\[0\] is str, expected \{role, content\}"),
        ("not a list", r"column 'messages' holds str, expected a list of turns"),
    ],
)
def test_malformed_conversations_name_row_and_turn(llama3_tokenizer, turns, message):
    with pytest.raises(DataError, match=message):
        render_conversation(row(turns), "messages", llama3_tokenizer, DataConfig(), "test")


def test_unknown_sharegpt_speaker_is_named(llama3_tokenizer):
    turns = [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]
    with pytest.raises(DataError, match=r"conversations\[1\]\.from is 'bot'; use one of human, user, gpt"):
        render_conversation(row(turns, fmt="conversations"), "sharegpt", llama3_tokenizer, DataConfig(), "test")


def test_rows_that_cannot_train_are_skipped_and_counted(data_config, llama3_train_tokenizer):
    good = {"messages": CONVERSATIONS["one_turn"]}
    rows = [
        good,
        {"messages": [{"role": "user", "content": "답 없는 질문"}]},
        {"messages": [{"role": "assistant", "content": "먼저 말함"}, {"role": "user", "content": "응"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
        {"messages": None},
        good,
    ]
    data = prepare(data_config(rows, "data.dedup=off").data, llama3_train_tokenizer)  # row 5 repeats row 0
    assert sorted(e.row for e in data.train) == [0, 5]
    assert {reason: sorted(rows) for reason, rows in data.train_stats.skipped_rows.items()} == {
        "no assistant turn": [1],
        "starts with an assistant turn": [2],
        "null content in a turn": [3],
        "null messages": [4],
    }


def test_template_without_an_end_of_turn_token_is_refused(llama3_tokenizer, tmp_path):
    path = tmp_path / "no_end.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"closes assistant turn 1 with no special token"):
        render_conversation(
            row(CONVERSATIONS["one_turn"]), "messages", llama3_tokenizer, DataConfig(chat_template=str(path)), ""
        )


def test_template_that_does_not_render_turn_by_turn_is_refused(llama3_tokenizer, tmp_path):
    path = tmp_path / "last.jinja"
    path.write_text(
        "{% for m in messages %}{% if loop.last %}[last] {% endif %}{{ m['content'] }}{{ eos_token }}{% endfor %}",
        encoding="utf-8",
    )
    with pytest.raises(TemplateError, match=r"renders the turns before turn 1 differently"):
        render_conversation(
            row(CONVERSATIONS["one_turn"]), "messages", llama3_tokenizer, DataConfig(chat_template=str(path)), ""
        )


def test_tokenizer_without_chat_template_needs_one_named(llama3_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama3_dir)
    tok.chat_template = None
    with pytest.raises(TemplateError, match=r"the tokenizer has none; set data.chat_template to plain"):
        render_conversation(row(CONVERSATIONS["one_turn"]), "messages", tok, DataConfig(), "")


@pytest.mark.slow
def test_conversations_train_end_to_end_on_cpu(tmp_path, tiny_llama3_model, monkeypatch, capsys):
    from kotune.cli import main

    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    rows = [{"messages": CONVERSATIONS[name]} for name in sorted(CONVERSATIONS)] * 2
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "out"
    config = tmp_path / "chat.yaml"
    config.write_text(
        f"model: {{path: {tiny_llama3_model}, quantization: none, compute_dtype: float32}}\n"
        f"data: {{path: {data}, val_size: 0.2, cutoff_len: 128, dedup: 'off'}}\n"  # each conversation twice
        f"train: {{output_dir: {out}, max_steps: 2, gradient_accumulation_steps: 2, warmup_steps: 1, "
        "eval_steps: 2, save_steps: 2, optimizer: adamw_torch, learning_rate: 0.001, min_free_disk_gb: 0}\n",
        encoding="utf-8",
    )
    assert main(["train", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "kotune: audit" in printed and "(messages)" in printed
    assert (out / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))
    assert summary["train_rows"] == 8
    # the chat template is saved with the adapter, so inference renders conversations as training did
    from transformers import AutoTokenizer

    saved, base = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_llama3_model)
    assert saved.chat_template == base.chat_template
