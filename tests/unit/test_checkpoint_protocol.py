"""The checkpoint protocol on a tiny LoRA model: what a save writes, which checkpoint a resume picks (partial and
broken ones ignored), what it restores, and the final adapter written whole or not at all."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from kotune.config_load import load_config
from kotune.training.checkpoint import (
    CheckpointError,
    latest_good,
    list_checkpoints,
    read_checkpoint,
    remove_partial,
    restore_rng,
    trim_metrics,
    verify,
    write_adapter,
    write_checkpoint,
)
from kotune.training.resume import already_finished, find_resume

STATE = {"step": 4, "micro_step": 8, "tokens": 123, "bad_steps": 0, "skipped_steps": 1, "best_eval_loss": 2.5}


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """A LoRA model and an AdamW optimizer that has taken one step (so it holds moments and a step count)."""
    from kotune.training.build import load_for_training
    from kotune.training.optim import build_optimizer

    overrides = ["model.quantization=none", "model.compute_dtype=float32", "train.optimizer=adamw_torch"]
    cfg = load_config(None, [f"model.path={tiny_model_dir}", *overrides])
    model = load_for_training(cfg, tiny_model_dir).peft
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
    (loss + 1).backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def save(out: Path, step: int, trained, **kwargs) -> Path:
    model, optimizer = trained
    return write_checkpoint(out, step, model, optimizer, {**STATE, "step": step}, **kwargs)


def silent(_: str) -> None:
    pass


def test_a_checkpoint_restores_adapter_optimizer_rng_and_counters(trained, tmp_path):
    model, optimizer = trained
    torch.manual_seed(11)
    random.seed(11)
    folder = save(tmp_path, 4, trained, fingerprint={"examples": "abc"})
    expected = (torch.rand(3), random.random())  # the draws right after the save
    adapter, optimizer_state, state = read_checkpoint(folder)
    lora = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert adapter.keys() == lora.keys() and all(torch.equal(adapter[k], lora[k]) for k in lora)
    for index, moments in optimizer.state_dict()["state"].items():
        for key, value in moments.items():
            assert torch.equal(optimizer_state["state"][index][key], value), (index, key)
    torch.manual_seed(0)
    random.seed(0)
    restore_rng(state.pop("rng_tensors"), state.pop("rng"))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert {k: state[k] for k in STATE} == STATE
    assert json.loads((folder / "fingerprint.json").read_text()) == {"examples": "abc"}


def test_a_save_leaves_one_verified_folder_whose_marker_covers_every_file(trained, tmp_path):
    folder = save(tmp_path, 2, trained)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]
    marker = json.loads((folder / "COMPLETE").read_text())
    assert marker["step"] == 2 and set(marker["sha256"]) == {p.name for p in folder.iterdir()} - {"COMPLETE"}
    verify(folder)


def test_checkpoints_are_listed_by_step_and_partial_folders_are_not_checkpoints(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", ".tmp-checkpoint-12", ".old-checkpoint-9", "checkpoint-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]


@pytest.mark.parametrize("damage", ["no marker", "torn file", "missing file", "unreadable marker"])
def test_resume_skips_a_broken_newest_checkpoint(trained, tmp_path, damage):
    save(tmp_path, 2, trained)
    newest = save(tmp_path, 4, trained)
    if damage == "no marker":
        (newest / "COMPLETE").unlink()
    elif damage == "torn file":
        data = (newest / "adapter_model.safetensors").read_bytes()
        (newest / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing file":
        (newest / "rng.safetensors").unlink()
    else:
        (newest / "COMPLETE").write_text("{")
    logged: list[str] = []
    assert find_resume(tmp_path, "auto", logged.append) == tmp_path / "checkpoint-2"
    assert len(logged) == 1 and logged[0].startswith(f"kotune: skipping {newest}")
    with pytest.raises(CheckpointError):
        read_checkpoint(newest)


def test_resume_with_nothing_saved_starts_afresh_but_all_broken_is_an_error(trained, tmp_path):
    assert find_resume(tmp_path, None, silent) is None
    logged: list[str] = []
    assert find_resume(tmp_path, "auto", logged.append) is None and "starting from step 0" in logged[0]
    (save(tmp_path, 2, trained) / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="every checkpoint is incomplete or corrupt"):
        find_resume(tmp_path, "auto", silent)


def test_resume_from_a_named_folder(trained, tmp_path):
    folder = save(tmp_path, 2, trained)
    save(tmp_path, 4, trained)
    assert find_resume(tmp_path, str(folder), silent) == folder
    with pytest.raises(CheckpointError, match=r"checkpoints in .*: checkpoint-2, checkpoint-4"):
        find_resume(tmp_path, str(tmp_path / "checkpoint-3"), silent)


def test_leftovers_of_a_killed_save_are_removed_and_nothing_else(trained, tmp_path):
    kept = save(tmp_path, 2, trained)
    leftovers = [tmp_path / ".tmp-checkpoint-4", tmp_path / ".old-checkpoint-2", tmp_path / ".tmp-adapter"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-metrics.jsonl").write_text("a file is not a save folder")
    assert latest_good(tmp_path, silent) == kept
    assert sorted(remove_partial(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-metrics.jsonl", "checkpoint-2"]
    verify(kept)


def test_the_final_adapter_is_written_whole_or_not_at_all(trained, tmp_path):
    model, _ = trained
    write_adapter(model, tmp_path, None, keep_free=0)
    first = (tmp_path / "adapter_model.safetensors").read_bytes()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match="the final adapter needs about"):
        write_adapter(model, tmp_path, None, keep_free=1 << 62)  # more free space asked for than any disk has
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == first
    assert not list(tmp_path.glob(".tmp-*"))
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"the best adapter's weights")
    write_adapter(model, tmp_path, other, keep_free=0)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"the best adapter's weights"


def test_a_low_disk_refuses_the_save_and_keeps_the_previous_checkpoint(trained, tmp_path):
    previous = save(tmp_path, 2, trained)
    with pytest.raises(CheckpointError, match=f"the previous checkpoint {previous} is intact"):
        save(tmp_path, 4, trained, keep_free=1 << 62)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_metrics_after_the_checkpoint_are_dropped_for_the_replay(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "eval_loss": 1.1}, {"step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo', encoding="utf-8")
    assert trim_metrics(path, 2) == 2  # step 3 and the torn line
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    assert trim_metrics(path, -1) == 3 and path.read_text() == ""


def test_a_finished_run_is_recognised_and_cannot_be_shortened(trained, tmp_path):
    folder = save(tmp_path, 4, trained)
    assert not already_finished(folder, tmp_path, 4, silent)  # no summary: the final adapter was never written
    (tmp_path / "run_summary.json").write_text(json.dumps({"steps": 4}))
    assert already_finished(folder, tmp_path, 4, silent)
    assert not already_finished(folder, tmp_path, 6, silent)  # extended with a larger max_steps
    with pytest.raises(CheckpointError, match="past this config's end"):
        already_finished(folder, tmp_path, 3, silent)


def test_after_bad_steps_the_checkpoint_named_to_resume_from_is_the_last_whose_weights_gave_a_finite_loss(
    trained, tmp_path
):
    """Step s's checkpoint holds the weights step s + 1 computed its loss with: after non-finite steps 5 and 6
    (lr 1e3), checkpoint-4's weights gave step 5's non-finite loss, so the one to resume from is checkpoint-2,
    with the --force a changed learning rate needs."""
    from kotune.training.loop import checkpoints_to_resume

    assert checkpoints_to_resume(tmp_path, 5, 1e-4) == "no checkpoint was written yet"
    for step in (2, 4):
        save(tmp_path, step, trained)
    message = checkpoints_to_resume(tmp_path, 5, 250.0)
    assert message.startswith(f"the last checkpoint, {tmp_path / 'checkpoint-4'}, holds weights that gave a non-finite")
    assert f"the last one before that is {tmp_path / 'checkpoint-2'}" in message
    assert f"--resume {tmp_path / 'checkpoint-2'} train.learning_rate=250 --force" in message
    assert checkpoints_to_resume(tmp_path, 6, 1.0).startswith(
        f"the last good checkpoint is {tmp_path / 'checkpoint-4'}"
    )
    assert checkpoints_to_resume(tmp_path, 3, 1.0).endswith("and none was kept before it")


def test_a_disk_full_while_writing_the_final_files_says_resume_writes_them_again(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """The last checkpoint is whole; the final files are not (a truncated tokenizer.json once ended in a
    traceback): one error names the checkpoint and --resume, which then finishes the run."""
    import errno

    from kotune.cli import main
    from kotune.training import recipe
    from tests.unit.test_pinned_run import write_config

    config = write_config(tmp_path, tiny_model_dir, **{"train.max_steps": 2, "train.eval_steps": 2})
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(recipe, "save_template", full)
        assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("kotune: error: no space left on the disk while writing the run's final files")
    assert "the checkpoint at step 2 is complete" in error and "--resume" in error
    run = tmp_path / "run"
    assert not (run / "run_summary.json").exists() and (run / "checkpoint-2").is_dir()
    assert main(["train", str(config), "--resume"]) == 0
    assert (run / "run_summary.json").is_file()


def test_resuming_from_the_saved_config_is_not_a_change_of_data_format():
    """A run started with ``data.format: auto`` saves the format it detected in its kotune_config.yaml; resuming
    from that file is the same run (the rows' hash decides), while a concrete format changed is still named."""
    from kotune.training.fingerprint import differences

    same_rows = {"data": {}, "examples": "rows", "tokenizer": "t", "template": "p"}
    auto = {**same_rows, "config": {"data.format": "auto", "train.learning_rate": 2e-4}}
    alpaca = {**same_rows, "config": {"data.format": "alpaca", "train.learning_rate": 2e-4}}
    assert differences(auto, alpaca) == [] and differences(alpaca, auto) == []
    other_rows = {**same_rows, "examples": "other", "config": {"data.format": "sharegpt", "train.learning_rate": 2e-4}}
    assert differences(auto, other_rows) == ["tokenized training / validation rows: changed"]
    assert "config data.format: 'alpaca' -> 'sharegpt'" in differences(alpaca, other_rows)
