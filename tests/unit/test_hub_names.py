"""A hub model name is checked before anything loads it: from the cache it passes unchanged; not cached, offline or
with the hub out of reach, it is one error at once naming what to do (it used to retry for a minute and end in a
traceback). The unit tier refuses every connection, which is what an unreachable hub looks like."""

from __future__ import annotations

import pytest

from kotune.model.assets import resolve_model
from kotune.model.hub import HubModelError

NAME = "beomi/Llama-3-Open-Ko-8B"


def test_a_cached_hub_model_passes_unchanged(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--beomi--Llama-3-Open-Ko-8B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123", encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model(NAME) == NAME


def test_offline_and_not_cached_is_named_at_once():
    with pytest.raises(HubModelError, match=r"not in the Hugging Face cache, offline; download it once .*--offline"):
        resolve_model(NAME)


def test_an_unreachable_hub_is_named_at_once(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(HubModelError, match=r"huggingface.co cannot be reached .*local model folder"):
        resolve_model(NAME)


def test_offline_flag_and_a_hub_model_in_plan_is_one_line(tmp_path, monkeypatch, capsys):
    from kotune.cli import main
    from kotune.model.hub import OFFLINE_VARIABLES

    for name in OFFLINE_VARIABLES:  # --offline sets them in this process: undone after the test
        monkeypatch.setenv(name, "0")
    config = tmp_path / "hub.yaml"
    config.write_text(f"model:\n  path: {NAME}\ndata:\n  path: {tmp_path / 'rows.jsonl'}\n", encoding="utf-8")
    assert main(["--offline", "plan", str(config), "--gpu", "L4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kotune: error: model.path {NAME}: a hub model") and "\n" not in err
