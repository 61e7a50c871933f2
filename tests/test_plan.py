"""``kotune plan`` and ``kotune train --fit / --force`` on a tiny model: the plan's parts for a named GPU, and a run
that would not fit stopped before the model loads (the estimate's arithmetic: tests/unit/test_plan_estimate.py)."""

from __future__ import annotations

from kotune.cli import main
from kotune.plan.gpus import Gpu

MODEL_LOADED = "trainable params:"
"""Printed by kotune.training.build.load_for_training: seeing it means the model was loaded."""


def write_config(tiny_train_config, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(tiny_train_config(tmp_path / "run", {}).to_yaml(), encoding="utf-8")
    return path


def test_plan_command_prints_the_parts_for_a_named_gpu(tiny_train_config, tmp_path, capsys):
    code = main(["plan", str(write_config(tiny_train_config, tmp_path)), "--gpu", "L4", "--fit"])
    out = capsys.readouterr().out
    assert code == 0, out
    for part in ("base weights (", "LoRA", "activations (longest pass", "predicted peak", "fits", "time:"):
        assert part in out
    assert "kotune: fits with train.micro_batch_size=" in out


def test_plan_without_a_gpu_asks_for_one(tiny_train_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kotune.plan.gpus.present_gpu", lambda: None)
    code = main(["plan", str(write_config(tiny_train_config, tmp_path))])
    assert code == 2 and "--gpu" in capsys.readouterr().err


def test_train_stops_a_run_that_would_not_fit_before_the_model_loads(tiny_train_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kotune.plan.gpus.present_gpu", lambda: Gpu("small", 1 << 20, 100.0))  # 1 MiB card
    config = write_config(tiny_train_config, tmp_path)
    code = main(["train", str(config)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    error = [line for line in captured.err.splitlines() if line.startswith("kotune: error: ")]
    assert len(error) == 1 and "does not fit small" in error[0] and "training rows" in error[0], captured.err
    assert "--fit" in error[0] and "--force" in error[0]
    assert "predicted peak" in captured.out  # the plan was shown first
    assert MODEL_LOADED not in captured.out


def test_force_trains_anyway(tiny_train_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("kotune.plan.gpus.present_gpu", lambda: Gpu("small", 1 << 20, 100.0))
    code = main(["train", str(write_config(tiny_train_config, tmp_path)), "--force"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "DOES NOT FIT" in captured.out and MODEL_LOADED in captured.out
