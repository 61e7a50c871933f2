"""A mixed run's ``report.md`` shows each source's held-out loss apart; a run of one source has no such section."""

from __future__ import annotations

import json
import sys

from conftest import write_jsonl

from kotune.evaluation.run_report import write_run_report

MIXED = [
    {"step": 1, "loss": 3.0},
    {"step": 2, "eval_loss": 2.4, "eval_loss[ko]": 2.0, "eval_loss[en]": 3.1},
    {"step": 4, "eval_loss": 2.2, "eval_loss[ko]": 1.7, "eval_loss[en]": 3.3},
]


def report_of(tmp_path, monkeypatch, records: list[dict]) -> str:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the tables only: no plots drawn
    write_jsonl(tmp_path / "metrics.jsonl", records)
    (tmp_path / "run_summary.json").write_text(json.dumps({"steps": 4, "audit": []}))
    return write_run_report(tmp_path).read_text(encoding="utf-8")


def test_each_source_has_its_row_of_held_out_losses(tmp_path, monkeypatch):
    text = report_of(tmp_path, monkeypatch, MIXED)
    assert "## Validation loss by source" in text
    assert "| ko | 2.0000 | 1.7000 | 1.7000 | 4 |" in text  # first, last, best, its step
    assert "| en | 3.1000 | 3.3000 | 3.1000 | 2 |" in text


def test_a_run_of_one_source_has_no_by_source_section(tmp_path, monkeypatch):
    one = [{k: v for k, v in r.items() if "[" not in k} for r in MIXED]
    assert "by source" not in report_of(tmp_path, monkeypatch, one)
