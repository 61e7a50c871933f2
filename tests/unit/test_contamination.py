"""Contamination: training rows holding evaluation text are named, exactly, on a constructed set; templated
questions that differ in a word are not mistaken for each other."""

from __future__ import annotations

import json

from conftest import write_jsonl

from kotune.config_load import config_from_text
from kotune.data.contamination import Overlap, find_overlaps
from kotune.data.prepare import prepare
from kotune.data.read import read_rows
from kotune.paths import CHOICE_SET

QUESTIONS = [(0, "'덥다'의 반대말은 무엇인가요?"), (1, "조선을 세운 사람은 누구인가요?"), (2, "짧음")]
ANSWERS = [(4, "캔버라입니다. 가장 큰 도시인 시드니와 혼동하기 쉽습니다.")]
TRAINING = [
    (0, "문제: '덥다'의 반대말은   무엇인가요? 답: 춥다"),  # holds question 0 (spacing differs)
    (1, "'춥다'의 반대말은 무엇인가요? 답: 덥다"),  # the same template, another word: not question 0
    (2, "호주의 수도: 캔버라입니다. 가장 큰 도시인 시드니와 혼동하기 쉽습니다."),  # holds answer 4
    (3, "짧음"),  # a reference too short to check
    (4, "조선을 세운 사람은?"),  # part of question 1 only
]


def test_overlaps_on_a_constructed_set():
    found = find_overlaps([TRAINING], {"choice": QUESTIONS, "held": ANSWERS})
    assert found == [Overlap(0, 0, "choice", 0), Overlap(0, 2, "held", 4)]


def test_the_audit_names_rows_holding_held_out_bundled_and_listed_text(tmp_path, monkeypatch, mock_tokenizer):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    bundled = read_rows(str(CHOICE_SET))[7]["question"]
    mine = write_jsonl(
        tmp_path / "mine.jsonl", [{"question": "고려를 세운 왕은 누구인가요?", "choices": ["a", "b"], "answer": 0}]
    )
    train = [{"prompt": f"질문 {i}", "completion": f"서로 다른 답변 번호 {i}번입니다"} for i in range(8)]
    train[2]["prompt"] = f"다음에 답하세요. {bundled}"
    train[5]["completion"] = "고려를 세운 왕은 누구인가요? 왕건입니다."
    train[6]["completion"] = "검증에만 있어야 할 긴 정답 문장입니다, 그대로 새었습니다."
    held = [{"prompt": "다른 질문", "completion": "검증에만 있어야 할 긴 정답 문장입니다, 그대로 새었습니다."}]
    data = {
        "path": str(write_jsonl(tmp_path / "train.jsonl", train)),
        "validation_path": str(write_jsonl(tmp_path / "val.jsonl", held)),
        "contamination_sets": [str(mine)],
    }
    prepared = prepare(config_from_text(json.dumps({"data": data}), "t").data, mock_tokenizer, log=lambda _: None)
    (finding,) = [f for f in prepared.audits[0].findings if f.code == "contamination"]
    assert finding.rows == [2, 5, 6] and finding.level == "warning"
    assert finding.message.startswith("3 training rows (37.5% of 8) hold the text of evaluation rows")
    assert f"{mine} (1)" in finding.message and "kotune eval's bundled set (1)" in finding.message
    assert "row 6 ~ " in finding.message and "val.jsonl (held out) (1)" in finding.message
    assert not [f for f in prepared.audits[1].findings if f.code == "contamination"]
