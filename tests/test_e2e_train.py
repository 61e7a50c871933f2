"""End to end on CPU: the shipped demo trains SmolLM2-135M-Instruct in 4-bit NF4 through the CLI (``demo_run``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_demo_writes_the_output_file_set(demo_run):
    names = {p.name for p in demo_run.iterdir()}
    expected = {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "kotune_template.yaml",
        "kotune_config.yaml",
        "metrics.jsonl",
        "run_summary.json",
    }
    assert expected <= names
    assert not list(demo_run.rglob("*.bin")) and not list(demo_run.rglob("*.pt")), "only safetensors are written"


@pytest.mark.slow
def test_demo_validation_loss_falls(demo_run):
    evals = [r["eval_loss"] for r in records(demo_run) if "eval_loss" in r]
    assert len(evals) >= 3  # before training, mid-way, at the end
    assert evals[-1] < evals[0] - 0.05, evals


@pytest.mark.slow
def test_demo_lora_weights_changed_and_load_with_plain_peft(demo_run, smollm2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = load_file(demo_run / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.isfinite(t).all() for t in adapter.values())
    assert sum(t.abs().sum().item() for t in lora_b) > 0, "lora_B starts at zero; training must move it"
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, demo_run)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = base.get_base_model()(ids).logits if hasattr(base, "get_base_model") else None
        tuned = model(ids).logits
        with model.disable_adapter():
            untuned = model(ids).logits
    assert plain is None or plain.shape == tuned.shape
    assert not torch.allclose(tuned, untuned), "the loaded adapter must change the model's output"


@pytest.mark.slow
def test_a_finished_demo_run_is_extended_by_resume(demo_run, tmp_path):
    """``--resume train.max_steps=N`` on the finished demo continues from its final checkpoint: the logged steps
    stay, two new steps follow with the schedule recomputed, and the adapter moves on."""
    import shutil

    from conftest import DEMO_CONFIG, run_kotune

    run = shutil.copytree(demo_run, tmp_path / "run")
    before = records(run)
    steps = max(r["step"] for r in before if "loss" in r)
    args = ["train", str(DEMO_CONFIG), f"train.output_dir={run}", "--resume", f"train.max_steps={steps + 2}"]
    result = run_kotune(args, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    after = records(run)
    assert after[: len(before)] == before  # nothing logged so far is replayed or dropped
    new = [r for r in after[len(before) :] if "loss" in r]
    assert [r["step"] for r in new] == [steps + 1, steps + 2]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in new)
    moved, trained = load_file(run / "adapter_model.safetensors"), load_file(demo_run / "adapter_model.safetensors")
    assert any(not torch.equal(moved[name], trained[name]) for name in trained if "lora_B" in name)
