"""Tokens per second in ``metrics.jsonl`` and on the progress bar: input tokens/s (fed, padding not counted, what
other tools report) beside trained tokens/s, over the window since the last logged step."""

from __future__ import annotations

import time

import pytest

from kotune.training.report import Throughput, bar_figures


@pytest.fixture
def clock(monkeypatch):
    """``time.perf_counter`` reading a value the test sets."""
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    return now


def step(tokens: int, input_tokens: int) -> dict:
    return {"step": 1, "loss": 1.0, "tokens": tokens, "input_tokens": input_tokens}


def test_input_and_trained_rates_share_the_window(clock):
    speed = Throughput()
    clock[0] += 2.0
    speed.add([step(300, 1000)])
    clock[0] += 2.0  # two records read together: the four seconds are theirs together
    speed.add([step(500, 1400), step(200, 600)])
    assert speed.rates() == {"tokens_per_s": 1000 / 4, "input_tokens_per_s": 3000 / 4}


def test_a_restart_opens_a_new_window(clock):
    speed = Throughput()
    speed.add([step(100, 400)])
    clock[0] += 1.0
    assert speed.rates() == {"tokens_per_s": 100.0, "input_tokens_per_s": 400.0}
    speed.restart()
    clock[0] += 0.5
    speed.add([step(10, 80)])
    assert speed.rates() == {"tokens_per_s": 20.0, "input_tokens_per_s": 160.0}


def test_a_window_of_no_time_reads_zero(clock):
    speed = Throughput()
    speed.add([step(100, 400)])
    assert speed.rates() == {"tokens_per_s": 0.0, "input_tokens_per_s": 0.0}


def test_the_bar_names_input_and_trained_rates():
    record = {**step(5000, 8000), "loss": 1.23456, "tokens_per_s": 4999.6, "input_tokens_per_s": 8012.2}
    assert bar_figures(record) == {"loss": "1.2346", "input_tok_s": "8012", "trained_tok_s": "5000"}


def test_the_report_states_the_mean_of_both_rates():
    from kotune.evaluation.run_report import figure_lines, figures

    records = [
        {"step": 1, "loss": 2.0, "tokens_per_s": 100.0, "input_tokens_per_s": 300.0},
        {"step": 2, "loss": 1.5, "tokens_per_s": 200.0, "input_tokens_per_s": 500.0},
        {"step": 2, "eval_loss": 1.7},
    ]
    values = figures(records)
    assert values["mean_input_tokens_per_s"] == 400.0 and values["mean_tokens_per_s"] == 150.0
    lines = figure_lines(values)
    assert "| mean input tokens / s (padding not counted) | 400.0000 |" in lines
    assert "| mean trained tokens / s | 150.0000 |" in lines


def test_the_input_rate_is_the_one_bench_scripts_derive_from_a_window(clock):
    """``bench/ddp_scaling.py`` and ``bench/fsdp_bench.py`` derive input tokens/s from each record's ``input_tokens``
    over its time, ``tokens / tokens_per_s``: the window's records together give ``input_tokens_per_s``."""
    speed = Throughput()
    records = [step(300, 1000), step(500, 1400)]
    clock[0] += 3.0
    speed.add(records)
    for record in records:
        record.update(speed.rates())
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in records)
    assert seconds == pytest.approx(3.0)
    assert sum(r["input_tokens"] for r in records) / seconds == pytest.approx(records[0]["input_tokens_per_s"])
