"""JSON Lines split on ``\\n`` only: U+2028, U+2029 and U+0085 are valid unescaped inside a JSON string (scraped
web text holds them), and a reader splitting on them cut such a row in two and stopped with "not valid JSON"."""

from __future__ import annotations

import csv
import json

import pytest

from kotune.data.read import read_rows

SEPARATORS = {"LINE SEPARATOR": "\u2028", "PARAGRAPH SEPARATOR": "\u2029", "NEXT LINE": "\u0085"}


@pytest.mark.parametrize("name", SEPARATORS)
def test_a_separator_inside_a_string_stays_in_its_row(tmp_path, name):
    sep = SEPARATORS[name]
    rows = [
        {"instruction": f"첫 줄{sep}둘째 줄", "input": "", "output": "답"},
        {"instruction": "질문", "input": "", "output": f"답{sep}이어서"},
        {"messages": [{"role": "user", "content": f"안녕{sep}하세요"}, {"role": "assistant", "content": "네"}]},
    ]
    path = tmp_path / "rows.jsonl"
    # ensure_ascii=False writes the separator raw, as most scrapers do; \r\n line ends from Windows too
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert sep in path.read_text(encoding="utf-8")
    read = read_rows(str(path), "train")
    assert [r["_source"] for r in read] == [f"{path} line {n}" for n in (1, 2, 3)]
    assert read[0]["instruction"] == rows[0]["instruction"] and read[1]["output"] == rows[1]["output"]
    assert read[2]["messages"][0]["content"] == f"안녕{sep}하세요"


def test_a_separator_inside_a_csv_field_stays_in_its_row(tmp_path):
    path = tmp_path / "rows.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "output"])
        writer.writerow(["한\u2028줄", "답\u2029변"])
        writer.writerow(["둘째", "답"])
    read = read_rows(str(path), "train")
    assert [(r["instruction"], r["output"]) for r in read] == [("한\u2028줄", "답\u2029변"), ("둘째", "답")]
