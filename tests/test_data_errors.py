"""Bad input: each error names the file and the line / row / column, and comes out of the CLI without a traceback."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from kotune.cli import main
from kotune.config_load import load_config
from kotune.data.prepare import prepare
from kotune.data.read import DataError, read_rows

GOOD = {"instruction": "수도는?", "input": "", "output": "서울입니다."}


def test_malformed_jsonl_line_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    bad = '{"instruction": "a", "output": }'
    path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_rows(str(path))
    assert f"{path}: line 3 is not valid JSON" in str(err.value)
    assert f"at column {bad.index('}') + 1}" in str(err.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(GOOD) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl: line 2 is a JSON list, expected an object"):
        read_rows(str(path))


def test_non_utf8_file_names_file_position_and_encoding_to_try(tmp_path):
    path = tmp_path / "cp949.jsonl"
    text = json.dumps(GOOD, ensure_ascii=False) + "\n" + json.dumps({**GOOD, "output": "부산"}, ensure_ascii=False)
    path.write_bytes(text.encode("cp949"))
    with pytest.raises(DataError) as err:
        read_rows(str(path))
    message = str(err.value)
    assert str(path) in message and "line 1, column" in message
    assert "cp949" in message and "iconv -f cp949 -t utf-8" in message


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        read_rows(str(path))


def test_file_of_blank_lines_holds_no_rows(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.jsonl: file holds no rows"):
        read_rows(str(path))


def test_missing_column_is_named_with_the_columns_present(data_config, llama3_train_tokenizer):
    cfg = data_config([{"instruction": "a", "answer": "b"}], "data.format=alpaca")
    with pytest.raises(DataError) as err:
        prepare(cfg.data, llama3_train_tokenizer)
    message = str(err.value)
    assert cfg.data.path in message
    assert "column 'output' is missing" in message and "columns present: answer, instruction" in message


def test_mixed_types_in_a_column_names_the_row_and_line(data_config, llama3_train_tokenizer):
    rows = [GOOD, GOOD, {**GOOD, "output": 42}, GOOD]
    cfg = data_config(rows)
    with pytest.raises(DataError) as err:
        prepare(cfg.data, llama3_train_tokenizer)
    message = str(err.value)
    assert f"{cfg.data.path} line 3: column 'output' holds number" in message
    assert f"first at {cfg.data.path} line 1" in message


def test_a_list_where_text_belongs_names_the_row(data_config, llama3_train_tokenizer):
    cfg = data_config([{**GOOD, "output": ["a", "b"]}])
    with pytest.raises(DataError, match=r"line 1 \(row 0\): column 'output' holds a list, expected text"):
        prepare(cfg.data, llama3_train_tokenizer)


def test_null_output_rows_are_skipped_and_counted(data_config, llama3_train_tokenizer):
    rows = [GOOD, {**GOOD, "output": None}, GOOD, {**GOOD, "output": None}]
    data = prepare(data_config(rows, "data.dedup=off").data, llama3_train_tokenizer)  # rows 0 and 2 are alike
    assert sorted(e.row for e in data.train) == [0, 2]
    assert data.train_stats.skipped == {"null output": 2}
    assert sorted(data.train_stats.skipped_rows["null output"]) == [1, 3]


def test_csv_row_with_too_many_fields_names_the_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("instruction,input,output\na,,b\nc,d,e,f\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv: line 3 has 4 fields, the header has 3"):
        read_rows(str(path))


def test_csv_rows_name_their_line(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text('instruction,input,output\na,,"two\nlines"\nc,d,e\n', encoding="utf-8")
    rows = read_rows(str(path))
    assert [r["_source"] for r in rows] == [f"{path} line 2", f"{path} line 4"]


def test_json_file_of_a_scalar_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("42", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.json: expected a list of rows, got a JSON int"):
        read_rows(str(path))


def test_cli_prints_the_error_without_a_traceback(tmp_path, capsys, tiny_llama3_model, monkeypatch):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{oops\n", encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  path: {tiny_llama3_model}\ndata:\n  path: {data}\n", encoding="utf-8")
    assert main(["data", "audit", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"kotune: error: {data}: line 2 is not valid JSON" in err
    assert "Traceback" not in err


def test_config_loads_and_row_sources_name_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    cfg = load_config(None, [f"data.path={path}"])
    rows = read_rows(cfg.data.path)
    assert [(r["_row"], r["_source"]) for r in rows] == [(0, f"{path} line 1"), (1, f"{path} line 2")]
