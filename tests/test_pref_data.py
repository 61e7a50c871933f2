"""Preference pairs with the real Llama-3 tokenizer: masks of chosen and rejected on tricky rows, the
conversational form against the chat template's own ids, truncation, and the audit's additions."""

from __future__ import annotations

import pytest
from tricky_rows import TRICKY_ROWS

from kotune.config_load import load_config
from kotune.data.examples import IGNORE
from kotune.data.formats import detect_format
from kotune.data.preference import (
    PreferenceText,
    UnpairedResponse,
    collate_pairs,
    encode_pairs,
    is_preference,
    is_unpaired,
    render_pairs,
)
from kotune.data.preference_audit import audit_pairs
from kotune.data.read import DataError
from kotune.data.templates import KO_ALPACA


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _rows(rows: list[dict]) -> list[dict]:
    return [{**row, "_row": i} for i, row in enumerate(rows)]


def _config(*overrides: str):
    return load_config(
        overrides=["train.objective=dpo", "data.cutoff_len=256", "preference.max_prompt_len=128", *overrides]
    )


def test_detects_the_three_shapes():
    assert is_preference([{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert is_preference([{"instruction": "q", "input": "", "chosen": "a", "rejected": "b"}])
    assert is_preference([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}])
    assert not is_preference([{"prompt": "q", "completion": "a"}])


@pytest.mark.parametrize("name", sorted(TRICKY_ROWS))
def test_alpaca_style_masks_are_exact(llama3_tokenizer, name):
    """Chosen = the tricky output, rejected = another answer: each response's labels are its own ids + EOS,
    the prompt is the template's text encoded alone behind BOS, whatever the tokenizer merges across them."""
    tok, row = llama3_tokenizer, TRICKY_ROWS[name]
    if not isinstance(row.get("output"), str) or not row["output"].strip():
        pytest.skip("no response text in this row")
    rows = _rows(
        [
            {
                "instruction": row["instruction"],
                "input": row.get("input"),
                "chosen": row["output"],
                "rejected": "잘 모르겠습니다.",
            }
        ]
    )
    data = render_pairs(rows, _config("data.cutoff_len=4096", "preference.max_prompt_len=4000"), KO_ALPACA, tok, "t")
    (pair,) = data.pairs
    prompt_text = KO_ALPACA.format(row["instruction"], row.get("input"))
    assert pair.prompt == [tok.bos_token_id, *_ids(tok, prompt_text)]
    assert pair.chosen == [*_ids(tok, row["output"]), tok.eos_token_id]
    assert tok.decode(pair.chosen[:-1]) == row["output"]
    assert pair.rejected == [*_ids(tok, "잘 모르겠습니다."), tok.eos_token_id]
    batch = collate_pairs(data.pairs, tok.eos_token_id)
    for k, response in enumerate((pair.chosen, pair.rejected)):
        trained = batch["input_ids"][k][batch["labels"][k] != IGNORE].tolist()
        assert trained == response
        assert batch["labels"][k][: len(pair.prompt)].eq(IGNORE).all()


def test_conversation_matches_the_chat_templates_ids(llama3_tokenizer):
    """prompt + chosen is exactly the chat template's tokenization of the conversation up to the end-of-turn."""
    tok = llama3_tokenizer
    messages = [{"role": "user", "content": "한국의 수도는 어디인가요?"}]
    rows = _rows(
        [
            {
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": "서울입니다."}],
                "rejected": "부산입니다.",
            },
            {"system": "짧게 답하세요.", "prompt": "2+2는?", "chosen": "4", "rejected": "5"},
        ]
    )
    data = render_pairs(rows, _config(), KO_ALPACA, tok, "t")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    first, second = data.pairs
    for pair, convo, replies in (
        (first, messages, ("서울입니다.", "부산입니다.")),
        (second, [{"role": "system", "content": "짧게 답하세요."}, {"role": "user", "content": "2+2는?"}], ("4", "5")),
    ):
        for reply, response in zip(replies, (pair.chosen, pair.rejected), strict=True):
            full = tok.apply_chat_template([*convo, {"role": "assistant", "content": reply}], tokenize=True)
            full = full if isinstance(full, list) else full["input_ids"]
            assert full[: len(pair.prompt) + len(response)] == pair.prompt + response
            assert response[-1] == eot and tok.decode(response[:-1]) == reply
    assert first.prompt.count(tok.bos_token_id) == 1


def test_unpaired_rows_mask_their_completion_and_keep_their_label(llama3_tokenizer):
    """KTO's unpaired rows (prompt, completion, label), text and conversational: the completion's labels are its
    own ids (+ EOS for text prompts, the end-of-turn for chat ones); the label rides along to the batch."""
    tok = llama3_tokenizer
    assert is_unpaired([{"prompt": "q", "completion": "a", "label": True}])
    assert not is_unpaired([{"prompt": "q", "completion": "a", "label": "yes"}])
    assert not is_preference([{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(DataError, match="train.objective=kto"):  # SFT would learn the undesirable completions too
        detect_format([{"prompt": "q", "completion": "a", "label": False}], "t.jsonl")
    messages = [{"role": "user", "content": "한국의 수도는?"}]
    rows = _rows(
        [
            {"prompt": "질문: 2+2는?\n답변:", "completion": " 4입니다.", "label": True},
            {"prompt": messages, "completion": [{"role": "assistant", "content": "부산"}], "label": False},
            {"prompt": "빈 답", "completion": " ", "label": True},
        ]
    )
    data = render_pairs(rows, _config("train.objective=kto"), KO_ALPACA, tok, "t")
    text, chat = data.pairs
    assert isinstance(text, UnpairedResponse) and (text.desirable, chat.desirable) == (True, False)
    assert text.prompt == [tok.bos_token_id, *_ids(tok, "질문: 2+2는?\n답변:")]
    assert text.completion == [*_ids(tok, " 4입니다."), tok.eos_token_id]
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": "부산"}], tokenize=True)
    full = full if isinstance(full, list) else full["input_ids"]
    assert full[: len(chat.prompt) + len(chat.completion)] == chat.prompt + chat.completion
    assert chat.completion[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert data.skipped == {2: "empty response"}
    batch = collate_pairs(data.pairs, tok.eos_token_id)
    assert batch["desirable"].tolist() == [True, False] and batch["input_ids"].shape[0] == 2
    for k, item in enumerate(data.pairs):
        assert batch["input_ids"][k][batch["labels"][k] != IGNORE].tolist() == item.completion
    report = audit_pairs("t", data, len(rows), 256, 128)
    found = {f.code: f for f in report.findings}
    assert "1 desirable and 1 undesirable" in found["label_balance"].message
    assert report.trained_tokens == len(text.completion) + len(chat.completion)


def test_truncation_keeps_the_prompts_end_and_counts_lost_eos(llama3_tokenizer):
    tok = llama3_tokenizer
    prompt = " ".join(f"단어{i}" for i in range(200)) + " 끝"
    long_reply = " ".join(f"답{i}" for i in range(300))
    texts = [PreferenceText(0, prompt, long_reply, "짧음", True), PreferenceText(1, "짧은 질문", "네", "아니요", True)]
    data = encode_pairs(texts, tok, cutoff_len=160, max_prompt_len=40)
    cut, short = data.pairs
    full_prompt = _ids(tok, prompt)
    assert cut.prompt == [tok.bos_token_id, *full_prompt[-39:]]  # BOS stays, the end is kept
    assert len(cut.prompt) + len(cut.chosen) == 160 and cut.chosen[-1] != tok.eos_token_id
    assert cut.rejected[-1] == tok.eos_token_id  # the short response keeps its EOS
    assert data.prompt_cut == [0] and data.eos_lost == [0]
    assert short.chosen == [*_ids(tok, "네"), tok.eos_token_id]


def test_audit_reports_identical_empty_duplicates_and_length_bias(llama3_tokenizer):
    rows = [
        {"prompt": f"질문 {i}", "chosen": f"자세하고 긴 좋은 답변 {i}입니다. 이유도 설명합니다.", "rejected": "몰라요"}
        for i in range(8)
    ]
    rows += [
        {"prompt": "같음", "chosen": "같은 답", "rejected": "같은 답"},
        {"prompt": "빈 답", "chosen": "", "rejected": "무언가"},
        dict(rows[0]),
    ]
    rows = _rows(rows)
    cfg = _config()
    data = render_pairs(rows, cfg, KO_ALPACA, llama3_tokenizer, "t")
    report = audit_pairs("t", data, len(rows), 256, 128)
    found = {f.code: f for f in report.findings}
    assert found["identical_pair"].rows == [8]
    assert found["empty_response"].rows == [9] and data.skipped == {9: "empty response"}
    assert found["duplicates"].rows == [10]
    assert found["length_ratio"].level == "warning"
    assert report.kept == len(rows) - 1 and not report.fatal()


def test_data_audit_and_preview_read_preference_pairs(tmp_path, tiny_llama3_model, capsys):
    """`kotune data audit` reports the pair audit; `kotune data preview` shows chosen and rejected with the
    prompt masked."""
    import json

    from conftest import write_jsonl

    from kotune.cli import main

    rows = [{"prompt": f"질문 {i}?", "chosen": f"좋은 답 {i}", "rejected": f"나쁜 답 {i}"} for i in range(6)]
    rows.append({"prompt": "같음?", "chosen": "같은 답", "rejected": "같은 답"})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    overrides = [
        f"model.path={tiny_llama3_model}",
        f"data.path={data}",
        "data.val_size=0",
        "train.objective=dpo",
        "data.cutoff_len=64",
        "preference.max_prompt_len=32",
        "data.cache=false",
    ]
    config = tmp_path / "config.yaml"
    config.write_text(load_config(overrides=overrides).to_yaml(), encoding="utf-8")
    args = [str(config)]
    assert main(["data", "audit", "--json", *args]) == 0
    report = json.loads(capsys.readouterr().out)["reports"][0]
    assert report["format"] == "preference" and report["kept"] == 7
    assert [f["rows"] for f in report["findings"] if f["code"] == "identical_pair"] == [[6]]
    assert main(["data", "preview", "--json", *args]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert shown[0]["row"] == shown[1]["row"]  # chosen, then rejected, of one pair
    assert (
        shown[0]["input_ids"][: shown[0]["labels"].count(-100)]
        == shown[1]["input_ids"][: shown[1]["labels"].count(-100)]
    )


def test_data_audit_and_preview_read_unpaired_rows(tmp_path, tiny_llama3_model, capsys):
    """`kotune data audit` on unpaired KTO rows counts the labels; `kotune data preview` shows each response once."""
    import json

    from conftest import write_jsonl

    from kotune.cli import main

    rows = [{"prompt": f"질문 {i}?", "completion": f"답 {i}", "label": i % 3 != 0} for i in range(6)]
    data = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    overrides = [f"model.path={tiny_llama3_model}", f"data.path={data}", "data.val_size=0", "train.objective=kto"]
    overrides += ["data.cutoff_len=64", "preference.max_prompt_len=32", "data.cache=false"]
    config = tmp_path / "config.yaml"
    config.write_text(load_config(overrides=overrides).to_yaml(), encoding="utf-8")
    assert main(["data", "audit", "--json", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)["reports"][0]
    assert report["kept"] == 6
    assert [f["message"][:32] for f in report["findings"] if f["code"] == "label_balance"] == [
        "4 desirable and 2 undesirable re"
    ]
    assert main(["data", "preview", "--json", str(config)]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len({s["row"] for s in shown}) == len(shown)  # one example per response
