"""``report.md`` and its plots, and ``kotune eval`` / ``kotune report`` end to end on the tiny 4-bit run."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import TINY_TRAIN_ROWS, run_kotune, write_jsonl

METRICS = [
    {"step": 0, "eval_loss": 2.5},
    *[
        {
            "step": s,
            "loss": 3.0 - 0.1 * s,
            "lr": 1e-3 * min(1, s / 2),
            "tokens": 100,
            "tokens_per_s": 50.0 + s,
            "input_tokens_per_s": 150.0 + s,
        }
        for s in range(1, 11)
    ],
    {"step": 5, "eval_loss": 2.0},
    {"step": 10, "eval_loss": 2.1},
]


@pytest.fixture
def run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", METRICS)
    (run / "run_summary.json").write_text(json.dumps({"steps": 10, "audit": ["audit data.jsonl: 12 rows"]}))
    (run / "kotune_config.yaml").write_text("train:\n  learning_rate: 0.001\n")
    return run


@pytest.mark.compat("matplotlib")
def test_report_plots_are_real_images(run_folder):
    from matplotlib.image import imread  # a base dependency: no skip when it is missing

    from kotune.evaluation.run_report import write_run_report

    text = write_run_report(run_folder).read_text(encoding="utf-8")
    for name in ("loss", "lr", "tokens_per_s"):
        png = run_folder / "report" / f"{name}.png"
        assert f"](report/{name}.png)" in text
        assert png.stat().st_size > 5000
        pixels = imread(png)
        assert pixels.shape[0] > 100 and pixels.std() > 0.05  # a drawn curve, not a blank canvas
    assert not (run_folder / "report" / "memory.png").exists()  # nothing logged for it
    assert "audit data.jsonl: 12 rows" in text and "learning_rate: 0.001" in text


def test_report_plots_the_gpu_memory_metrics_jsonl_logs(run_folder, monkeypatch):
    """The figures ``training.memory.peak`` logs on a GPU (faked here) are drawn (the plot once looked for keys
    nothing logs)."""
    import torch

    from kotune.evaluation.run_report import write_run_report
    from kotune.training.memory import GIB, peak

    for name, value in [("is_available", True), ("is_initialized", True), ("reset_peak_memory_stats", None)]:
        monkeypatch.setattr(torch.cuda, name, lambda value=value: value)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5.5 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 6.0 * GIB)
    logged = peak()
    assert logged
    gpu = [{**r, **logged} if "loss" in r else r for r in METRICS]
    write_jsonl(run_folder / "metrics.jsonl", gpu)
    text = write_run_report(run_folder).read_text(encoding="utf-8")
    assert "](report/memory.png)" in text and (run_folder / "report" / "memory.png").stat().st_size > 5000


def test_report_numbers_match_metrics(run_folder):
    from kotune.evaluation.run_report import write_run_report

    text = write_run_report(run_folder).read_text(encoding="utf-8")
    figures = dict(re.findall(r"^\| ([^|]+?) \| ([-\d.]+) \|$", text, flags=re.M))
    train = [r["loss"] for r in METRICS if "loss" in r]
    evals = [r["eval_loss"] for r in METRICS if "eval_loss" in r]
    assert float(figures["first training loss"]) == pytest.approx(train[0], abs=1e-4)
    assert float(figures["last training loss"]) == pytest.approx(train[-1], abs=1e-4)
    assert float(figures["best validation loss"]) == pytest.approx(min(evals), abs=1e-4)
    assert int(figures["step of the best validation loss"]) == 5
    assert float(figures["mean trained tokens / s"]) == pytest.approx(55.5, abs=1e-4)
    assert float(figures["mean input tokens / s (padding not counted)"]) == pytest.approx(155.5, abs=1e-4)


def test_report_of_a_run_still_training_says_it_has_not_finished(run_folder):
    from kotune.evaluation.run_report import write_run_report

    (run_folder / "run_summary.json").unlink()  # written last: a run in progress has none
    text = write_run_report(run_folder).read_text(encoding="utf-8")
    head = text.split("## Figures")[0]
    assert "This run has not finished" in head and "as of step 10" in head
    assert "No audit summary" not in text and "recorded in `run_summary.json` when the run finishes" in text
    assert str(run_folder) not in text  # the report names the folder, not where it sits on this machine


def test_report_of_a_finished_run_has_no_in_progress_note(run_folder):
    from kotune.evaluation.run_report import write_run_report

    assert "has not finished" not in write_run_report(run_folder).read_text(encoding="utf-8")


def test_report_names_no_local_folder_and_notes_the_unsaved_merge_target(run_folder):
    from kotune.evaluation.run_report import write_run_report

    data = run_folder.parent / "data" / "train.jsonl"
    (run_folder / "kotune_config.yaml").write_text(f"data:\n  path: {data}\n", encoding="utf-8")
    (run_folder / "merged").mkdir()
    targets = {"dequantized": {"top1_agreement": 0.99}, "original": {"top1_agreement": 0.646}}
    report = {"into": "dequantized", "run": str(run_folder), "targets": targets}
    (run_folder / "merged" / "merge_report.json").write_text(json.dumps(report), encoding="utf-8")
    text = write_run_report(run_folder).read_text(encoding="utf-8")
    assert str(run_folder.parent) not in text
    assert "path: train.jsonl" in text and '"run": "run"' in text
    assert "a low top-1 agreement on `original` is expected" in text


def test_report_where_matplotlib_cannot_be_imported_says_so(run_folder, monkeypatch):
    import sys

    from kotune.evaluation.run_report import write_run_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    text = write_run_report(run_folder).read_text(encoding="utf-8")
    assert "matplotlib (a kotune dependency) could not be imported" in text and "kotune[eval]" not in text
    assert "first training loss" in text


def test_eval_and_report_cli_on_the_tiny_run(tiny_qlora_run, tmp_path):
    run, cache, _ = tiny_qlora_run
    env = {"KOTUNE_CACHE": str(cache)}
    assert (run / "report.md").is_file(), "kotune train writes the run report"
    rows = [
        {"instruction": f"하늘은 왜 파란가요? {i}", "input": "", "output": "햇빛이 산란하기 때문입니다."}
        for i in range(3)
    ]
    rows[2]["output"] = TINY_TRAIN_ROWS[0]["output"]  # a trained answer: its scores are marked
    data = write_jsonl(tmp_path / "heldout.jsonl", rows)
    common = ["--data", str(data), "--limit", "3", "--max-new-tokens", "6"]
    base = run_kotune(["eval", str(run), "--base", *common, "--out", str(tmp_path / "base")], env)
    assert base.returncode == 0, base.stderr[-3000:]
    tuned = run_kotune(["eval", str(run), *common, "--compare", str(tmp_path / "base")], env)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    report = json.loads((run / "eval" / "eval_report.json").read_text(encoding="utf-8"))
    assert report["model"]["kind"] == "adapter" and report["compared_with"]["kind"] == "base"
    assert report["loss"]["rows"] == 3 and len(report["replies"]) == 3 and report["choice"]["items"] == 3
    assert 0 <= report["generation"]["stop_rate"] <= 1
    table = (run / "eval" / "eval_report.md").read_text(encoding="utf-8")
    assert "| metric | base | adapter run | change |" in table and "ends with EOS" in table
    assert "not comparable" not in table  # the same held-out rows and tokenizer: every change is a change
    assert report["overlap"] == {"heldout": {"rows": [2], "of": 3}}
    assert "| loss (held-out rows) ⚠ overlaps training |" in table and "multiple choice acc |" in table
    assert "1 of 3 held-out rows hold text of the run's training rows" in table
    done = run_kotune(["report", str(run)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| metric | base | adapter run | change |" in (run / "report.md").read_text(encoding="utf-8")
    missing = run_kotune(["eval", str(tmp_path / "nowhere")], env)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    if importlib.util.find_spec("lm_eval") is not None:  # an unknown task stops before the model loads
        unknown = run_kotune(["eval", str(run), "--tasks", "no_such_task_kotune"], env)
        assert unknown.returncode == 2 and "unknown lm-eval task(s): no_such_task_kotune" in unknown.stderr
