"""Numerical faults, resources and signals: NaN steps are skipped then stop the run; disk and OOM errors say
what to change; SIGTERM saves a resumable checkpoint and a second signal exits at once.

Faults are injected with torch's global forward hooks (a public PyTorch API) or with a model whose weights
are set to NaN, so the real training code runs unchanged.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_ROWS, build_tiny_model, write_jsonl
from safetensors.torch import load_file, save_file

from kotune.training.checkpoint import CheckpointError, latest_good, list_checkpoints, read_checkpoint, verify
from kotune.training.loop import NonFiniteLoss
from kotune.training.recipe import OutOfMemory, oom_advice, train


def training_forwards(hook_body):
    """Register ``hook_body(module, output, n)`` for the n-th (1-based) training forward of the LoRA model."""
    from peft import PeftModel

    seen = [0]

    def hook(module, args, output):
        if isinstance(module, PeftModel) and module.training:
            seen[0] += 1
            return hook_body(module, output, seen[0])
        return None

    return torch.nn.modules.module.register_module_forward_hook(hook)


def nan_logits_on_steps(steps: set[int], micro_batches_per_step: int = 2):
    """Make the logits NaN on every micro-batch of the given optimizer steps."""

    def body(module, output, n):
        if (n - 1) // micro_batches_per_step + 1 in steps:
            output.logits = output.logits * float("nan")
            return output
        return None

    return training_forwards(body)


def records(output_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_nan_step_is_skipped_counted_and_the_run_goes_on(tiny_train_config, tmp_path):
    out = tmp_path / "run"
    handle = nan_logits_on_steps({3})
    try:
        train(tiny_train_config(out, {"train.max_bad_steps": 2}))
    finally:
        handle.remove()
    losses = {r["step"]: r for r in records(out) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert [s for s, r in losses.items() if r["skipped"]] == [3]
    assert json.loads((out / "run_summary.json").read_text())["skipped_steps"] == 1
    _, optimizer_state, state = read_checkpoint(out / "checkpoint-4")
    assert state["skipped_steps"] == 1 and state["bad_steps"] == 0
    assert all(int(s["step"]) == 3 for s in optimizer_state["state"].values()), "step 3 must not update"
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())


@pytest.mark.slow
def test_the_fused_optimizer_skips_a_nan_step_on_the_device_read_only_at_logged_steps(
    tiny_train_config, tmp_path, monkeypatch
):
    """As on a GPU: steps are read only when logged, evaluated or saved, and the update is skipped by the
    optimizer from a tensor (``found_inf``), not by the host; the run's numbers are those of a run read every
    step."""
    from kotune.training import loop

    def run(out, lazy: bool):
        if lazy:
            monkeypatch.setattr(loop, "settles_each_step", lambda device: False)
        handle = nan_logits_on_steps({5})  # step 5 is neither logged, evaluated nor saved: read at step 6
        overrides = {"train.max_bad_steps": 2, "train.optimizer": "adamw_fused", "train.logging_steps": 3}
        try:
            train(tiny_train_config(out, overrides))
        finally:
            handle.remove()
            monkeypatch.undo()
        return records(out)

    eager, lazy = run(tmp_path / "eager", False), run(tmp_path / "lazy", True)
    rates = ("tokens_per_s", "input_tokens_per_s")  # wall-clock figures: the only keys that may differ
    strip = [{k: v for k, v in r.items() if k not in rates} for r in lazy]
    assert strip == [{k: v for k, v in r.items() if k not in rates} for r in eager]
    assert [r["step"] for r in lazy if "loss" in r] == [3, 6]
    assert json.loads((tmp_path / "lazy" / "run_summary.json").read_text())["skipped_steps"] == 1
    _, optimizer_state, state = read_checkpoint(tmp_path / "lazy" / "checkpoint-6")
    assert state["skipped_steps"] == 1 and state["bad_steps"] == 0
    assert all(int(s["step"]) == 5 for s in optimizer_state["state"].values()), "step 5 must not update"


@pytest.mark.slow
def test_read_only_when_saved_bad_steps_still_stop_the_run_before_the_save(tiny_train_config, tmp_path, monkeypatch):
    from kotune.training import loop

    monkeypatch.setattr(loop, "settles_each_step", lambda device: False)
    out = tmp_path / "run"
    overrides = {"train.max_bad_steps": 2, "train.optimizer": "adamw_fused", "train.logging_steps": 100}
    handle = nan_logits_on_steps({3, 4, 5, 6})
    try:
        with pytest.raises(NonFiniteLoss, match="the last at step 4"):
            train(tiny_train_config(out, overrides))
    finally:
        handle.remove()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]


@pytest.mark.slow
def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(tiny_train_config, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_train_config(out, {"train.max_bad_steps": 2})
    handle = nan_logits_on_steps({3, 4, 5, 6})
    try:
        with pytest.raises(NonFiniteLoss) as stopped:
            train(cfg)
    finally:
        handle.remove()
    message = str(stopped.value)
    assert "2 consecutive steps with a non-finite loss" in message and "the last at step 4" in message
    assert "on data rows [" in message and str(out / "checkpoint-2") in message
    assert "train.learning_rate" in message
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    verify(out / "checkpoint-2")
    # the kept checkpoint is a good place to continue from once the cause is gone
    train(cfg, resume="auto")
    losses = {r["step"]: r for r in records(out) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and not any(r["skipped"] for r in losses.values())


def test_a_run_in_which_no_update_was_applied_ends_with_an_error(tiny_train_config, tmp_path):
    out = tmp_path / "run"
    handle = nan_logits_on_steps({1, 2})
    try:
        with pytest.raises(NonFiniteLoss, match="no update was applied: all 2 steps had a non-finite loss"):
            train(tiny_train_config(out, {"train.max_steps": 2, "train.max_bad_steps": 5}))
    finally:
        handle.remove()
    assert not (out / "adapter_model.safetensors").exists() and not (out / "run_summary.json").exists()


def test_the_nan_stop_names_untrained_special_tokens_the_audit_found():
    from types import SimpleNamespace

    from kotune.data.audit import WARNING, Finding
    from kotune.training.recipe import untrained_tokens_hint

    finding = Finding("untrained_special_tokens", WARNING, "special tokens ... look untrained: <|im_end|>")
    audits = (SimpleNamespace(findings=[finding]),)
    assert untrained_tokens_hint(audits) == f". Likely cause, from the data audit: {finding.message}"
    assert untrained_tokens_hint((SimpleNamespace(findings=[]),)) == ""


POISON = "<|reserved_special_token_5|>"
"""A Llama-3 special token that encodes to one id and appears in no other row."""


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory, llama3_dir, llama3_tokenizer) -> str:
    """The tiny model with the embedding row of ``POISON`` set to NaN: any row holding it has a NaN loss."""
    folder = tmp_path_factory.mktemp("poisoned")
    build_tiny_model(folder, llama3_dir)
    (token_id,) = llama3_tokenizer(POISON, add_special_tokens=False)["input_ids"]
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][token_id] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def test_the_stop_names_the_rows_of_the_bad_step(tiny_train_config, poisoned_model, tmp_path):
    rows = [dict(r) for r in TINY_TRAIN_ROWS]
    rows[13]["instruction"] += POISON
    data = write_jsonl(tmp_path / "poisoned.jsonl", rows)
    overrides = {
        "model.path": poisoned_model,
        "data.path": str(data),
        "data.val_size": 0,
        "train.micro_batch_size": 4,
        "train.max_steps": 3,  # 3 steps x 2 micro-batches x 4 rows = the whole 24-row epoch
        "train.max_bad_steps": 1,
    }
    with pytest.raises(NonFiniteLoss) as stopped:
        train(tiny_train_config(tmp_path / "run", overrides))
    named = json.loads(str(stopped.value).split("on data rows ")[1].split("]")[0] + "]")
    assert 13 in named and len(named) == 8


@pytest.mark.slow
def test_low_disk_stops_the_run_before_writing(tiny_train_config, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="train.min_free_disk_gb asks to keep 1000000000.00 GB free"):
        train(tiny_train_config(out, {"train.min_free_disk_gb": 1e9}))
    assert not list(out.glob("*checkpoint*"))
    assert max(r["step"] for r in records(out)) == 2, "the run stops at its first save"


def test_cuda_out_of_memory_is_reported_with_a_smaller_setting(tiny_train_config, tmp_path):
    def body(module, output, n):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = training_forwards(body)
    try:
        with pytest.raises(OutOfMemory) as caught:
            train(tiny_train_config(tmp_path / "run", {"train.micro_batch_size": 4}))
    finally:
        handle.remove()
    message = str(caught.value)
    assert "data.cutoff_len=128 and train.micro_batch_size=4" in message
    assert "try train.micro_batch_size=2 train.gradient_accumulation_steps=4 (effective batch 8 -> 8)" in message
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_cuda_out_of_memory_is_reported_with_a_smaller_setting(tiny_train_config, tmp_path):
    # 128 rows of ~4k tokens in one micro-batch: the plain path's logits alone (128 x 4096 x 128k fp32) are 270 GB.
    rows = [{"instruction": "질문", "input": "", "output": "하늘 " * 4000} for _ in range(128)]
    overrides = {
        "data.path": str(write_jsonl(tmp_path / "long.jsonl", rows)),
        "data.val_size": 0,
        "data.cutoff_len": 4096,
        "data.dedup": "off",  # 128 copies of one row: the batch is the point
        "train.micro_batch_size": 128,
        "train.gradient_accumulation_steps": 1,
        "train.max_steps": 1,
        "train.kernels": "off",
    }
    with pytest.raises(OutOfMemory) as caught:  # force: past the plan, which (rightly) predicts this does not fit
        train(tiny_train_config(tmp_path / "run", overrides), force=True)
    message = str(caught.value)
    assert "data.cutoff_len=4096 and train.micro_batch_size=128" in message
    assert "try train.micro_batch_size=64 train.gradient_accumulation_steps=2 (effective batch 128 -> 128)" in message


def test_oom_advice_halves_the_cutoff_when_the_micro_batch_is_one(tiny_train_config, tmp_path):
    cfg = tiny_train_config(tmp_path, {"data.cutoff_len": 4096, "model.gradient_checkpointing": False})
    advice = oom_advice(cfg)
    assert "try data.cutoff_len=2048" in advice and "model.gradient_checkpointing=true" in advice


def run_cli(args: list[str], log: Path) -> subprocess.Popen:
    """``kotune ARGS`` in a subprocess, stdout and stderr into ``log`` (a file: a pipe could fill and block)."""
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, "-m", "kotune.cli", *args], stdout=sink, stderr=subprocess.STDOUT)


def wait_for_steps(metrics: Path, n: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended early with status {process.returncode}"
        if metrics.is_file() and sum('"loss"' in x for x in metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"{metrics}: fewer than {n} steps after {timeout}s")


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_exits_nonzero(tiny_train_config, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(tiny_train_config(out, {"train.max_steps": 6, "train.save_steps": 100}).to_yaml())
    process = run_cli(["train", str(config)], tmp_path / "first.log")
    wait_for_steps(out / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    stderr = (tmp_path / "first.log").read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM received: finishing this step and saving a checkpoint" in stderr
    assert f"kotune: to continue, run: kotune train {config} --resume" in stderr
    checkpoint = latest_good(out)
    step = max(r["step"] for r in records(out))
    assert checkpoint == out / f"checkpoint-{step}" and 2 <= step < 6
    assert f"stopped by SIGTERM after step {step}; checkpoint saved to {checkpoint}" in stderr

    resumed = run_cli(["train", str(config), "--resume"], tmp_path / "second.log")
    resumed.wait(timeout=600)
    stderr = (tmp_path / "second.log").read_text()
    assert resumed.returncode == 0, stderr
    assert f"resumed from {checkpoint} at step {step}" in stderr
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, 7))


def test_a_second_signal_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from kotune.training.signals import StopOnSignal\n"
        "with StopOnSignal() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.5)\n"
        "    print('first signal only flagged', stop.requested, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "    print('still running', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGINT
    assert done.stdout == "first signal only flagged True\n"
    assert "second signal (SIGINT): exiting now" in done.stderr


def test_signal_handlers_are_restored_on_leaving(tmp_path):
    from kotune.training.signals import StopOnSignal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopOnSignal():
        assert signal.getsignal(signal.SIGTERM) != before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
