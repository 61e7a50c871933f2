"""``kotune eval`` marks a score whose rows the run trained on: the run's training rows (each source's, less its
held-out rows) are searched for the evaluated rows' text, and the table marks the scores measured on them."""

from __future__ import annotations

import json

from conftest import write_jsonl

from kotune.config_load import config_from_text
from kotune.data.read import split_indices
from kotune.evaluation.overlap import eval_overlap
from kotune.evaluation.tables import OVERLAP_MARK, markdown

ANSWERS = [f"{i}번 문서: 서울의 봄 날씨는 대체로 맑고 건조하며 황사가 {i}일 정도 옵니다." for i in range(10)]


def config(tmp_path, val_size: float = 0.2):
    """Two sources: prompt / completion rows (10, ``val_size`` held out) and one conversation."""
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"질문 {i}", "completion": a} for i, a in enumerate(ANSWERS)])
    talk = [{"role": "user", "content": "대한민국의 수도는 어디인가요? 한 단어로 답하세요."}]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [*talk, {"role": "assistant", "content": "서울"}]}])
    data = {"val_size": val_size, "seed": 7, "sources": [{"path": str(qa), "weight": 1}, {"path": str(chat)}]}
    return config_from_text(json.dumps({"data": data}), "test.yaml")


def test_eval_rows_whose_text_was_trained_on_are_found(tmp_path):
    cfg = config(tmp_path)
    train, held = split_indices(10, 0.2, 7)
    heldout = [(0, ANSWERS[train[0]]), (1, ANSWERS[held[0]]), (2, "전혀 다른 새로운 문장으로 된 참고 답변입니다.")]
    choice = [(0, "대한민국의 수도는 어디인가요?"), (1, "프랑스의 수도는 어디인가요? 한 단어로.")]
    found = eval_overlap(cfg, heldout, choice)
    # a trained answer is found; the source's own held-out row is not (it was never trained on)
    assert found == {"heldout": {"rows": [0], "of": 3}, "choice": {"rows": [0], "of": 2}}
    assert eval_overlap(config(tmp_path, val_size=0), heldout, choice)["heldout"]["rows"] == [0, 1]


def test_a_score_on_overlapping_rows_is_marked_in_the_table(tmp_path):
    choice = {"file": "ko.jsonl", "items": 2, "acc": 0.5, "acc_norm": 0.5, "by_subject": {}}
    report = {"model": {"name": "adapter"}, "loss": {"loss": 2.0, "perplexity": 7.4}, "choice": choice}
    clean = markdown({**report, "overlap": {}})
    assert OVERLAP_MARK not in clean and "memory" not in clean
    marked = markdown({**report, "overlap": {"choice": {"rows": [0], "of": 2}}})
    labels = {line.split(" | ")[0].lstrip("| ") for line in marked.splitlines() if line.startswith("|")}
    assert f"multiple choice acc{OVERLAP_MARK}" in labels and "loss (held-out rows)" in labels
    assert "1 of 2 multiple-choice items hold text of the run's training rows (first: 0)" in marked
    compared = markdown({**report, "overlap": {"heldout": {"rows": [1, 2], "of": 3}}}, report)
    assert f"| loss (held-out rows){OVERLAP_MARK} | 2 | 2 | +0 |" in compared


def test_training_data_that_is_gone_is_said_not_checked(tmp_path):
    cfg = config(tmp_path)
    cfg.data.sources[0].path = str(tmp_path / "moved.jsonl")
    found = eval_overlap(cfg, [(0, ANSWERS[0])], [])
    assert found.keys() == {"unchecked"} and "moved.jsonl: file not found" in found["unchecked"]
    assert "Overlap with the training data not checked" in markdown({"model": {"name": "m"}, "overlap": found})


def test_a_streamed_runs_training_data_is_not_searched(tmp_path):
    cfg = config(tmp_path)
    cfg.data.streaming = True
    assert "data.streaming" in eval_overlap(cfg, [(0, ANSWERS[0])], [])["unchecked"]
