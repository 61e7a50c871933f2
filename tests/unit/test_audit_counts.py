"""The data audit on crafted rows: every count and row id it reports, worked out by hand with the byte-level mock
tokenizer (a row of prompt P and completion C is 1 + len(P) + len(C) + 1 tokens: BOS, bytes, EOS)."""

from __future__ import annotations

import json

from conftest import write_jsonl

from kotune.cli import main
from kotune.data.prepare import prepare

ROWS = [
    {"prompt": "ab", "completion": "cd"},  # 0: 6 tokens, 3 trained (c, d, EOS)
    {"prompt": "ab", "completion": "cd"},  # 1: a duplicate of row 0
    {"prompt": "abcdefgh", "completion": "xyz"},  # 2: 13 tokens, cut at 10: BOS + 8 prompt + "x"; EOS lost
    {"prompt": "p" * 20, "completion": "z"},  # 3: 23 tokens, cut at 10 inside the prompt: nothing to train
    {"prompt": "q", "completion": None},  # 4: null completion, skipped before encoding
    {"prompt": "   ", "completion": "ok"},  # 5: whitespace prompt; 7 tokens, 3 trained
    {"prompt": "ab", "completion": ""},  # 6: empty completion; 4 tokens, only EOS trained
]
CUTOFF = 10


def quiet(_: str) -> None:
    pass


def audited(data_config, tokenizer, rows=ROWS, *overrides):
    data = prepare(data_config(rows, f"data.cutoff_len={CUTOFF}", *overrides).data, tokenizer, log=quiet)
    return data, data.audits[0]


def findings(report) -> dict[str, list]:
    by_code: dict[str, list] = {}
    for f in report.findings:
        by_code.setdefault(f.code, []).append(f)
    return by_code


def test_row_and_token_counts(data_config, mock_tokenizer):
    data, report = audited(data_config, mock_tokenizer)
    assert (report.format, report.rows, report.kept, report.cutoff_len) == ("prompt_completion", 7, 5, CUTOFF)
    assert report.tokens == 6 + 6 + 10 + 7 + 4  # kept rows, after the cutoff
    assert report.trained_tokens == 3 + 3 + 1 + 3 + 1
    assert sorted(e.row for e in data.train) == [0, 1, 2, 5, 6]
    assert sum(len(e.input_ids) for e in data.train) == report.tokens


def test_length_statistics_are_before_the_cutoff(data_config, mock_tokenizer):
    _, report = audited(data_config, mock_tokenizer)
    # encoded rows 0, 1, 2, 3, 5, 6: lengths 6, 6, 13, 23, 7, 4 (row 4 never reached the tokenizer)
    assert report.lengths == {"min": 4, "median": 6, "p95": 23, "max": 23}
    assert sum(count for _, _, count in report.histogram) == 6


def test_each_problem_is_reported_with_its_rows(data_config, mock_tokenizer):
    _, report = audited(data_config, mock_tokenizer)
    found = findings(report)
    assert [f.rows for f in found["truncated"]] == [[2, 3]]
    assert [f.rows for f in found["eos_lost"]] == [[2]]
    assert [f.rows for f in found["no_trained_tokens"]] == [[3]]
    assert [(f.rows, "null completion" in f.message) for f in found["skipped"]] == [([4], True)]
    empty = {f.message.split("'")[1]: f.rows for f in found["empty_field"]}
    assert empty == {"prompt": [5], "completion": [6]}
    assert [f.rows for f in found["duplicates"]] == [[1]]
    assert not report.fatal()


def test_the_closing_eos_is_checked_to_reach_the_labels(data_config, mock_tokenizer):
    _, report = audited(data_config, mock_tokenizer)
    (eos,) = findings(report)["eos_in_labels"]
    # untruncated kept rows 0, 1, 5, 6 end in EOS, and pad (256) is not EOS (258)
    assert eos.level == "info" and eos.rows == [] and "in 4/4 sampled rows" in eos.message
    assert not eos.message.startswith("pad == eos")


def test_pad_equal_to_eos_is_said(data_config, mock_tokenizer, mock_dir):
    from kotune.config import ModelConfig
    from kotune.model.load import load_tokenizer

    pad_is_eos = load_tokenizer(mock_dir, ModelConfig(pad_token="</s>"))
    _, report = audited(data_config, pad_is_eos)
    (eos,) = findings(report)["eos_in_labels"]
    assert eos.message.startswith("pad == eos (</s>)") and eos.rows == []


def test_train_stats_agree_with_the_audit(data_config, mock_tokenizer):
    data, _ = audited(data_config, mock_tokenizer)
    stats = data.train_stats
    assert (stats.rows, stats.kept, stats.truncated, stats.eos_lost) == (7, 5, 2, 1)
    assert {k: sorted(v) for k, v in stats.skipped_rows.items()} == {
        "no trained token left after the cutoff": [3],
        "null completion": [4],
    }


def test_nothing_to_train_is_fatal_and_names_every_row(data_config, mock_tokenizer):
    rows = [{"prompt": "p" * 20, "completion": "z"}, {"prompt": "q", "completion": None}]
    _, report = audited(data_config, mock_tokenizer, rows)
    (fatal,) = report.fatal()
    assert fatal.code == "nothing_to_train" and fatal.rows == [0, 1]


def test_audit_command_exit_codes_and_json(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p" * 20, "completion": "z"}])
    config = tmp_path / "audit.yaml"
    config.write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  val_size: 0\n  cutoff_len: {CUTOFF}\n")
    common = [str(config), "--json"]
    capsys.readouterr()
    assert main(["data", "audit", *common, f"data.path={good}"]) == 0
    (report,) = json.loads(capsys.readouterr().out)["reports"]
    assert (report["rows"], report["kept"], report["tokens"], report["trained_tokens"]) == (7, 5, 33, 11)
    assert report["trained_share"] == round(11 / 33, 4)
    assert main(["data", "audit", *common, f"data.path={bad}"]) == 1
    assert json.loads(capsys.readouterr().out)["fatal"] == 1


def test_tokens_per_hangul_syllable(data_config, mock_tokenizer):
    # every Hangul syllable is 3 UTF-8 bytes, so 3 mock tokens; one Hangul run per row, 6 syllables in all
    rows = [
        {"prompt": "x", "completion": "안녕하세요!"},
        {"prompt": "y?", "completion": "네"},
        {"prompt": "z", "completion": "no"},
    ]
    _, report = audited(data_config, mock_tokenizer, rows, "data.cutoff_len=300")
    (hangul,) = findings(report)["hangul"]
    assert hangul.message == (
        "3.00 tokens per Hangul syllable (6 syllables in 2 sampled rows): cutoff_len=300 holds about 100 syllables"
    )
