"""Checkpoint files: exact round trip, atomic writes, fallback past broken ones, disk checks, pruning, metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from kotune.training.checkpoint import (
    CheckpointError,
    check_free_space,
    estimate_size,
    latest_good,
    list_checkpoints,
    prune,
    read_checkpoint,
    remove_partial,
    restore_best,
    restore_rng,
    save_adapter,
    trim_metrics,
    verify,
    write_adapter,
    write_checkpoint,
)
from kotune.training.resume import find_resume


@pytest.fixture(scope="module")
def trained(tiny_train_config, tmp_path_factory):
    """A LoRA model and an AdamW optimizer that has taken one step (so it holds moments and a step count)."""
    from kotune.training.build import load_for_training
    from kotune.training.optim import build_optimizer

    cfg = tiny_train_config(tmp_path_factory.mktemp("unused"))
    model = load_for_training(cfg, cfg.model.path).peft
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
    (loss + 1).backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


STATE = {"step": 4, "micro_step": 8, "tokens": 123, "bad_steps": 0, "skipped_steps": 1, "best_eval_loss": 2.5}


def save(out: Path, step: int, trained, **kwargs) -> Path:
    model, optimizer = trained
    return write_checkpoint(out, step, model, optimizer, {**STATE, "step": step}, **kwargs)


def test_round_trip_restores_adapter_optimizer_rng_and_counters(trained, tmp_path):
    model, optimizer = trained
    torch.manual_seed(7)
    random.seed(7)
    folder = save(tmp_path, 4, trained, fingerprint={"examples": "abc"})
    expected_draws = (torch.rand(3), random.random())
    adapter, optimizer_state, state = read_checkpoint(folder)

    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(adapter) == len(lora) > 0
    for name, tensor in adapter.items():
        match = [v for k, v in lora.items() if k.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], tensor), name
    original = optimizer.state_dict()
    assert optimizer_state["param_groups"][0]["lr"] == original["param_groups"][0]["lr"]
    for index, moments in original["state"].items():
        for key, value in moments.items():
            assert torch.equal(optimizer_state["state"][index][key], value), (index, key)
    restore_rng(state.pop("rng_tensors"), state.pop("rng"))
    assert torch.equal(torch.rand(3), expected_draws[0]) and random.random() == expected_draws[1]
    assert {k: state[k] for k in STATE} == STATE
    assert json.loads((folder / "fingerprint.json").read_text()) == {"examples": "abc"}


def test_a_save_leaves_no_temporary_folder_and_verifies(trained, tmp_path):
    folder = save(tmp_path, 2, trained)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]
    marker = json.loads((folder / "COMPLETE").read_text())
    assert set(marker["sha256"]) == {p.name for p in folder.iterdir()} - {"COMPLETE"}
    verify(folder)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path):
    save(tmp_path, 2, trained)
    newest = save(tmp_path, 4, trained)
    data = (newest / "optimizer.safetensors").read_bytes()
    (newest / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    logged: list[str] = []
    assert latest_good(tmp_path, logged.append) == tmp_path / "checkpoint-2"
    assert logged == [
        f"kotune: skipping {newest}: optimizer.safetensors does not match its checksum (corrupt or changed)"
    ]
    assert find_resume(tmp_path, "auto", logged.append) == tmp_path / "checkpoint-2"
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        read_checkpoint(newest)


def test_checkpoint_without_marker_is_skipped(trained, tmp_path):
    save(tmp_path, 2, trained)
    newest = save(tmp_path, 4, trained)
    (newest / "COMPLETE").unlink()
    assert latest_good(tmp_path, lambda _: None) == tmp_path / "checkpoint-2"


def test_a_save_killed_midway_leaves_only_a_temporary_folder_that_is_ignored_then_removed(trained, tmp_path):
    save(tmp_path, 2, trained)
    partial = tmp_path / ".tmp-checkpoint-4"  # what a kill during write_checkpoint leaves
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    assert latest_good(tmp_path) == tmp_path / "checkpoint-2"
    assert remove_partial(tmp_path) == [partial] and not partial.exists()


def test_missing_optimizer_state_is_an_error_not_a_fresh_optimizer(trained, tmp_path):
    folder = save(tmp_path, 2, trained)
    (folder / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing; refusing to restart the optimizer"):
        read_checkpoint(folder)
    # auto-resume must not fall back to a fresh start when every checkpoint is broken
    with pytest.raises(CheckpointError, match="every checkpoint is incomplete or corrupt"):
        find_resume(tmp_path, "auto", lambda _: None)


def test_saving_a_step_again_replaces_it(trained, tmp_path):
    first = save(tmp_path, 2, trained)
    (first / "COMPLETE").unlink()  # the broken one a replay after resume writes over
    again = save(tmp_path, 2, trained)
    verify(again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_estimate_is_not_below_the_real_size(trained, tmp_path):
    model, optimizer = trained
    save_adapter(model, tmp_path / "best")
    folder = save(tmp_path, 2, trained)
    real = sum(p.stat().st_size for p in folder.iterdir())
    estimate = estimate_size(model, optimizer, with_best=True)
    assert real <= estimate <= real + (2 << 20)


def test_low_disk_refuses_the_save_and_keeps_the_previous_checkpoint(trained, tmp_path):
    previous = save(tmp_path, 2, trained)
    with pytest.raises(CheckpointError) as refused:
        save(tmp_path, 4, trained, keep_free=1 << 62)
    message = str(refused.value)
    assert "GB free" in message and "train.min_free_disk_gb" in message and str(previous) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    verify(previous)


def test_the_final_adapter_is_written_whole_or_not_at_all(trained, tmp_path):
    model, _ = trained
    write_adapter(model, tmp_path, None, keep_free=0)
    first = (tmp_path / "adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "README.md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with pytest.raises(CheckpointError) as refused:
        write_adapter(model, tmp_path, None, keep_free=1 << 62)
    assert "the final adapter needs about" in str(refused.value) and "train.min_free_disk_gb" in str(refused.value)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == first
    assert not list(tmp_path.glob(".tmp-*"))
    best = save_adapter(model, tmp_path / "best") / "adapter_model.safetensors"
    write_adapter(model, tmp_path, best, keep_free=0)  # the best adapter's weights, written the same way
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == best.read_bytes()


def test_free_space_check_passes_with_room(tmp_path):
    check_free_space(tmp_path, needed=1 << 20, keep_free=0)


def test_prune_never_deletes_a_protected_checkpoint(trained, tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step, trained)
    prune(tmp_path, keep=1, protect={tmp_path / "checkpoint-2"})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    prune(tmp_path, keep=None, protect=set())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_best_adapter_travels_with_the_checkpoint(trained, tmp_path):
    model, _ = trained
    save_adapter(model, tmp_path / "best")
    with_best = save(tmp_path, 2, trained)
    (tmp_path / "best" / "adapter_model.safetensors").write_bytes(b"a later, different best")
    restore_best(with_best, tmp_path)
    assert (tmp_path / "best" / "adapter_model.safetensors").read_bytes() == (
        with_best / "best_adapter.safetensors"
    ).read_bytes()
    (tmp_path / "best").rename(tmp_path / "gone")
    without_best = save(tmp_path, 4, trained)
    (tmp_path / "gone").rename(tmp_path / "best")
    restore_best(without_best, tmp_path)  # no eval before step 4: best/ from after it must go
    assert not (tmp_path / "best").exists()


def test_trim_metrics_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "eval_loss": 1.1}, {"step": 3, "loss": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo', encoding="utf-8")
    assert trim_metrics(path, 2) == 2
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]
    assert trim_metrics(path, 2) == 0
    assert trim_metrics(tmp_path / "absent.jsonl", 2) == 0
