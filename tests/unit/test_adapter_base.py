"""``model.adapter`` is checked against the base: a run records its base's identity, and an adapter trained on
another base of the same shapes is refused before the model loads (it used to load and train on the wrong weights,
and become DPO's reference)."""

from __future__ import annotations

import json

import pytest

from kotune.config import ConfigError
from kotune.hashing import model_identity
from kotune.model.lora import check_adapter_base
from tests.unit.conftest import build_tiny_model

# that a finished run records its base: test_pinned_run.py::test_a_finished_run_records_its_base (its trained run)


def test_an_adapter_of_another_base_in_the_same_shapes_is_refused(tmp_path, mock_dir, tiny_model_dir, capsys):
    other = build_tiny_model(tmp_path / "other", mock_dir, seed=1)  # same config, other weights
    assert model_identity(other) != model_identity(tiny_model_dir)
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "run_summary.json").write_text(json.dumps({"base": model_identity(tiny_model_dir)}), encoding="utf-8")
    check_adapter_base(str(run), tiny_model_dir)
    check_adapter_base(str(run / "checkpoint-2"), tiny_model_dir)  # a checkpoint: its run's record
    with pytest.raises(ConfigError, match="trained on another base than model.path"):
        check_adapter_base(str(run / "checkpoint-2"), other)
    (run / "run_summary.json").write_text("{}", encoding="utf-8")
    check_adapter_base(str(run), other)
    assert "records no base identity" in capsys.readouterr().err
