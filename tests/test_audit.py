"""The data audit: one crafted file per problem, asserting the reported count and row ids; exit codes; the
untrained special-token warning on a tiny model whose rows we zero; ``kotune train`` stopping before the model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, write_jsonl

from kotune.cli import main
from kotune.data.audit import FATAL
from kotune.data.prepare import prepare
from kotune.model.embeddings import check_embeddings


def row(instruction="질문", output="답", **extra):
    return {"instruction": instruction, "input": "", "output": output, **extra}


def audit(data_config, llama3_train_tokenizer, rows, *overrides):
    # Repeated rows are the handiest test data here; data.dedup=off keeps them in training (and still reports them).
    data = prepare(data_config(rows, "data.dedup=off", *overrides).data, llama3_train_tokenizer)
    return data, data.audits[0]


def finding(report, code):
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, f"expected one '{code}' finding, got {report.findings}"
    return found[0]


def codes(report):
    return {f.code for f in report.findings}


LONG = "아주 긴 답변입니다. " * 30


def test_truncated_rows(data_config, llama3_train_tokenizer):
    rows = [row(), row(output=LONG), row(), row(output=LONG)]
    _, report = audit(data_config, llama3_train_tokenizer, rows, "data.cutoff_len=64")
    f = finding(report, "truncated")
    assert f.rows == [1, 3] and f.message.startswith("2 rows are longer than cutoff_len=64")


def test_rows_that_lost_their_eos(data_config, llama3_train_tokenizer):
    rows = [row(output=LONG), row(), row(output=LONG)]
    data, report = audit(data_config, llama3_train_tokenizer, rows, "data.cutoff_len=64")
    f = finding(report, "eos_lost")
    assert f.rows == [0, 2] and f.message.startswith("2 rows lost their EOS")
    eos = llama3_train_tokenizer.eos_token_id
    assert {e.row for e in data.train if e.labels[-1] != eos} == {0, 2}


def test_rows_with_no_trainable_token(data_config, llama3_train_tokenizer):
    long_prompt = row(instruction=LONG)
    rows = [row(), long_prompt, row(), long_prompt, long_prompt]
    _, report = audit(data_config, llama3_train_tokenizer, rows, "data.cutoff_len=64")
    f = finding(report, "no_trained_tokens")
    assert f.rows == [1, 3, 4] and f.message.startswith("3 rows have no trainable token")
    assert report.kept == 2 and not report.fatal()


def test_no_trainable_token_at_all_is_fatal(data_config, llama3_train_tokenizer):
    rows = [row(instruction=LONG), row(instruction=LONG)]
    _, report = audit(data_config, llama3_train_tokenizer, rows, "data.cutoff_len=32")
    (fatal,) = report.fatal()
    assert fatal.code == "nothing_to_train" and fatal.rows == [0, 1]


def test_every_row_skipped_is_fatal_and_names_them(data_config, llama3_train_tokenizer):
    _, report = audit(data_config, llama3_train_tokenizer, [row(output=None), row(output=None), row(output=None)])
    (fatal,) = report.fatal()
    assert fatal.rows == [0, 1, 2] and "(rows 0, 1, 2)" in fatal.message


def test_empty_or_whitespace_fields(data_config, llama3_train_tokenizer):
    rows = [row(), row(output=""), row(instruction="   "), row(output=" \n"), row(input="")]
    _, report = audit(data_config, llama3_train_tokenizer, rows)
    by_column = {f.message.split("'")[1]: f for f in report.findings if f.code == "empty_field"}
    assert sorted(by_column) == ["instruction", "output"]  # an empty input is the no-input prompt, not a problem
    assert by_column["output"].rows == [1, 3] and "in 2 rows" in by_column["output"].message
    assert by_column["instruction"].rows == [2] and "in 1 rows" in by_column["instruction"].message


def test_empty_conversation_turns(data_config, llama3_train_tokenizer):
    turns = [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답"}]
    empty = [{"role": "user", "content": " "}, {"role": "assistant", "content": "답"}]
    rows = [{"messages": turns}, {"messages": empty}, {"messages": turns[:1] + [{"role": "assistant", "content": ""}]}]
    _, report = audit(data_config, llama3_train_tokenizer, rows)
    f = finding(report, "empty_field")
    assert f.rows == [1, 2] and "column 'messages'" in f.message


def test_exact_duplicates(data_config, llama3_train_tokenizer):
    rows = [row("a"), row("b"), row("c"), row("a"), row("b"), row("a", output="다른 답")]
    _, report = audit(data_config, llama3_train_tokenizer, rows)
    f = finding(report, "duplicates")
    assert f.rows == [3, 4] and f.message.startswith("2 rows repeat an earlier row")


def test_length_distribution_and_trained_share(data_config, llama3_train_tokenizer):
    tok = llama3_train_tokenizer
    outputs = ["가", "가나다라마바사", "하나 둘 셋 넷 다섯 여섯", "짧은 답", "조금 더 긴 답변입니다."]
    data, report = audit(data_config, tok, [row(output=o) for o in outputs])
    lengths = sorted(len(e.input_ids) for e in data.train)
    assert report.lengths == {"min": lengths[0], "median": lengths[2], "p95": lengths[4], "max": lengths[4]}
    assert sum(count for _, _, count in report.histogram) == 5
    trained = sum(len(tok(o, add_special_tokens=False)["input_ids"]) + 1 for o in outputs)  # response + EOS
    assert report.trained_tokens == trained and report.tokens == sum(lengths)
    assert report.trained_share == pytest.approx(trained / sum(lengths))


def test_pad_equal_to_eos_still_trains_eos(data_config, llama3_train_tokenizer):
    assert llama3_train_tokenizer.pad_token_id == llama3_train_tokenizer.eos_token_id
    _, report = audit(data_config, llama3_train_tokenizer, [row(), row(output="둘"), row(output=LONG)])
    f = finding(report, "eos_in_labels")
    assert f.level != FATAL and f.rows == []
    assert "pad == eos (<|end_of_text|>)" in f.message and "reaches the labels in 3/3 sampled rows" in f.message


def test_skipped_null_rows(data_config, llama3_train_tokenizer):
    rows = [row(), row(output=None), row(), row(output=None), row(output=None)]
    _, report = audit(data_config, llama3_train_tokenizer, rows)
    f = finding(report, "skipped")
    assert f.rows == [1, 3, 4] and f.message.startswith("3 rows skipped: null output")


def test_template_placeholders_against_columns(data_config, llama3_train_tokenizer):
    rows = [{"instruction": "질문", "output": "답", "category": "상식"}]
    _, report = audit(data_config, llama3_train_tokenizer, rows)
    assert "columns not used by format alpaca: category" in finding(report, "unused_columns").message
    text = finding(report, "template_columns").message
    assert "placeholders {input}, {instruction}" in text and "no column for {input}" in text


def test_tokens_per_hangul_syllable(data_config, llama3_train_tokenizer):
    tok = llama3_train_tokenizer
    rows = [row("한국어 질문", "English answer 123"), row("abc", "가나다 라마")]
    _, report = audit(data_config, tok, rows)
    text = finding(report, "hangul").message
    tokens = len(tok("한국어 질문", add_special_tokens=False)["input_ids"]) + len(
        tok("가나다 라마", add_special_tokens=False)["input_ids"]
    )
    assert text.startswith(f"{tokens / 10:.2f} tokens per Hangul syllable (10 syllables in 2 sampled rows)")


def test_no_hangul_no_hangul_finding(data_config, llama3_train_tokenizer):
    _, report = audit(data_config, llama3_train_tokenizer, [row("question", "answer")])
    assert "hangul" not in codes(report)


def test_clean_data_has_no_warnings(data_config, llama3_train_tokenizer):
    _, report = audit(data_config, llama3_train_tokenizer, [row("a"), row("b"), row("c")])
    assert [f for f in report.findings if f.level != "info"] == []


# -- untrained special-token embeddings ---------------------------------------------------------------------
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@pytest.fixture(scope="module")
def base_like_model(tmp_path_factory, llama3_dir):
    """A tiny model whose chat-template token rows are zero in both embedding matrices, like Llama-3 base."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("base-like")
    build_tiny_model(folder, llama3_dir)
    ids = AutoTokenizer.from_pretrained(llama3_dir).convert_tokens_to_ids(list(CHAT_TOKENS))
    weights = load_file(folder / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name][ids] = 0.0
    save_file(weights, folder / "model.safetensors")
    return str(folder), ids


def test_untrained_chat_tokens_are_named_with_the_fix(base_like_model, llama3_train_tokenizer):
    path, ids = base_like_model
    bos, eos = llama3_train_tokenizer.bos_token_id, llama3_train_tokenizer.eos_token_id
    f = check_embeddings(path, [bos, eos, *ids], llama3_train_tokenizer)
    named = [t for t in (llama3_train_tokenizer.convert_ids_to_tokens(i) for i in (bos, eos, *ids)) if t in f.message]
    assert named == list(CHAT_TOKENS)
    assert "data.chat_template=plain" in f.message and "lora.trainable_tokens=auto" in f.message
    assert f.tokens == sorted(ids)


def test_trained_rows_raise_no_warning(tiny_llama3_model, llama3_train_tokenizer):
    tok = llama3_train_tokenizer
    assert check_embeddings(tiny_llama3_model, tok.convert_tokens_to_ids(list(CHAT_TOKENS)), tok) is None


def test_identical_rows_look_untrained(tmp_path, llama3_dir, llama3_train_tokenizer):
    from safetensors.torch import load_file, save_file

    build_tiny_model(tmp_path, llama3_dir)
    ids = llama3_train_tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS))
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.embed_tokens.weight"][ids[:2]] = weights["model.embed_tokens.weight"][1000:1064].mean(0)
    save_file(weights, tmp_path / "model.safetensors")
    f = check_embeddings(str(tmp_path), ids, llama3_train_tokenizer)
    assert "<|start_header_id|> (model.embed_tokens.weight: identical to token" in f.message
    assert "<|end_header_id|> (model.embed_tokens.weight: identical to token" in f.message
    assert "<|eot_id|>" not in f.message


def write_config(tmp_path, model, data, *extra):
    config = tmp_path / "audit.yaml"
    lines = [f"model: {{path: {model}}}", f"data: {{path: {data}, {', '.join(['val_size: 0', *extra])}}}"]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(config)


def test_cli_audit_warns_about_base_model_chat_tokens(tmp_path, base_like_model, monkeypatch, capsys):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    turns = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요!"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    config = write_config(tmp_path, base_like_model[0], data)
    assert main(["data", "audit", config, "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)["reports"]
    (warning,) = [f for f in report["findings"] if f["code"] == "untrained_special_tokens"]
    assert all(token in warning["message"] for token in CHAT_TOKENS)
    assert main(["data", "audit", config, "data.chat_template=plain", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)["reports"]
    assert "untrained_special_tokens" not in {f["code"] for f in report["findings"]}


def test_trainable_tokens_auto_trains_exactly_the_untrained_rows(tmp_path, base_like_model, tiny_train_config):
    """The audit's fix, in kotune: ``lora.trainable_tokens=auto`` trains the flagged embedding rows (input and
    output) and leaves every other row of the base as it was."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kotune.config_load import load_config

    path, ids = base_like_model
    turns = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요!"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}] * 8)
    overrides = {"model.path": path, "data.path": str(data), "data.val_size": 0, "data.cache": False}
    overrides |= {"data.dedup": "off"}  # the eight copies are the training rows
    overrides |= {"lora.trainable_tokens": "auto", "train.max_steps": 2, "train.micro_batch_size": 2}
    cfg = tiny_train_config(tmp_path / "run", overrides)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml(), encoding="utf-8")
    assert main(["train", str(config)]) == 0
    saved = load_config(tmp_path / "run" / "kotune_config.yaml")
    assert saved.lora.trainable_tokens == list(CHAT_TOKENS)  # "auto" as resolved, sorted by id
    base = AutoModelForCausalLM.from_pretrained(path)
    before = [base.get_input_embeddings().weight.detach().clone(), base.lm_head.weight.detach().clone()]
    merged = PeftModel.from_pretrained(base, tmp_path / "run").merge_and_unload()
    after = [merged.get_input_embeddings().weight.detach(), merged.lm_head.weight.detach()]
    others = [i for i in range(before[0].shape[0]) if i not in ids]
    for old, new in zip(before, after, strict=True):
        assert (new[ids] != 0).any(dim=1).all()  # every flagged row moved off zero
        assert torch.equal(new[others], old[others])


def test_cli_audit_exits_non_zero_on_fatal_and_names_rows(tmp_path, tiny_llama3_model, monkeypatch, capsys):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", [row(instruction=LONG), row(instruction=LONG)])
    config = write_config(tmp_path, tiny_llama3_model, data, "cutoff_len: 32")
    assert main(["data", "audit", config]) == 1
    out = capsys.readouterr().out
    assert "FATAL: no row has a trainable token" in out and "rows 0, 1" in out
    assert "1 fatal problem(s); training would stop here" in out


def test_train_stops_on_a_fatal_problem_before_the_model_loads(tmp_path, tiny_llama3_model, monkeypatch, capsys):
    """Loading the model prints its parameter counts ("trainable params"): they must not appear."""
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", [row(instruction=LONG), row(instruction=LONG)])
    config = write_config(tmp_path, tiny_llama3_model, data, "cutoff_len: 32")
    assert main(["train", config, f"train.output_dir={tmp_path / 'out'}"]) == 2
    captured = capsys.readouterr()
    assert "kotune: audit: fatal: no row has a trainable token" in captured.out
    assert "the data audit found problems that would ruin training" in captured.err
    assert "trainable params" not in captured.out


def test_audit_json_matches_the_prepared_data(tmp_path, tiny_llama3_model, monkeypatch, capsys):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", [row("a"), row("b", output=None), row("a")])
    assert main(["data", "audit", write_config(tmp_path, tiny_llama3_model, data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fatal"] == 0
    (report,) = result["reports"]
    assert (report["rows"], report["kept"], report["format"]) == (3, 2, "alpaca")
    assert {f["code"]: f["rows"] for f in report["findings"] if f["rows"]} == {"skipped": [1], "duplicates": [2]}
    assert 0 < report["trained_share"] < 1
    assert 128001 in report["special_ids"] and set(report["special_ids"]) <= {128000, 128001}  # EOS, maybe BOS
