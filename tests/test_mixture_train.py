"""Training on a mixture: each source's held-out loss next to the overall one (the overall is the sources' weighted
by their trained tokens, as one loss over all held-out rows is); two processes train the steps one does from a
weighted three-source mixture; a mixed run killed and resumed is the uninterrupted one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_TRAIN_ROWS, write_jsonl
from safetensors.torch import load_file
from test_ddp import one_and_two_processes
from test_resume import SimulatedKill, by_step, kill_at_forward

from kotune.data.prepare import prepare
from kotune.model.load import load_tokenizer
from kotune.training.recipe import train


def test_each_source_has_its_held_out_loss(tiny_train_config, tmp_path, monkeypatch):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    ko = write_jsonl(tmp_path / "ko.jsonl", TINY_TRAIN_ROWS[:12])
    other = [{"prompt": f"Q{i}: why is the sky blue?", "completion": f"A{i}: scattering."} for i in range(12)]
    en = write_jsonl(tmp_path / "en.jsonl", other)
    sources = [{"path": str(ko), "name": "ko", "weight": 2}, {"path": str(en), "name": "en", "weight": 1}]
    overrides = {"data.sources": json.dumps(sources), "data.val_size": 0.25, "train.max_steps": 2}
    cfg = tiny_train_config(tmp_path / "run", overrides | {"train.eval_steps": 2, "train.save_steps": 2})
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in records if "eval_loss" in r]
    data = prepare(cfg.data, load_tokenizer(cfg.model.path, cfg.model), log=lambda _: None)
    tokens = {name: 0 for name in ("ko", "en")}
    for e in data.validation:
        tokens[data.source_names[e.source]] += sum(1 for t in e.labels[1:] if t != -100)
    assert all(n > 0 for n in tokens.values())
    mixed = sum(last[f"eval_loss[{n}]"] * tokens[n] for n in tokens) / sum(tokens.values())
    assert math.isclose(last["eval_loss"], mixed, rel_tol=1e-5)
    assert last["eval_loss[ko]"] != last["eval_loss[en]"]


def three_sources(tmp_path) -> str:
    """``data.sources`` of three local sources (weights 3, 1 and one epoch), as a command-line value."""
    answers = [{"prompt": f"Q{i}: why is the sky blue?", "completion": f"A{i}: scattering."} for i in range(10)]
    sums = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(8)]
    sources = [
        {"path": str(write_jsonl(tmp_path / "ko.jsonl", TINY_TRAIN_ROWS[:12])), "name": "ko", "weight": 3},
        {"path": str(write_jsonl(tmp_path / "en.jsonl", answers)), "name": "en", "weight": 1},
        {"path": str(write_jsonl(tmp_path / "sums.jsonl", sums)), "name": "sums"},
    ]
    return json.dumps(sources)


@pytest.mark.slow
def test_two_processes_train_the_same_mixture_steps_as_one(tiny_train_config, tmp_path):
    overrides = {"data.sources": three_sources(tmp_path), "lora.dropout": 0.0, "train.max_steps": 3}
    overrides |= {"train.micro_batch_size": 2, "train.eval_steps": 3, "train.save_steps": 3}
    two, _ = one_and_two_processes(tiny_train_config, tmp_path, overrides)
    steps = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(steps) == 3 and all(min(r["input_tokens_per_process"]) > 0 for r in steps)
    evals = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in x]
    assert {"eval_loss[ko]", "eval_loss[en]", "eval_loss[sums]"} <= evals[-1].keys()


def test_a_killed_mixed_run_resumes_to_the_uninterrupted_one(tiny_train_config, tmp_path):
    """Killed in step 3 (forward 5, two micro-batches a step), resumed from checkpoint-2: the same losses, per-source
    held-out losses and adapter as a run that was never stopped."""
    overrides = {"data.sources": three_sources(tmp_path), "train.max_steps": 4, "train.eval_steps": 2}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(tiny_train_config(reference, overrides))
    cfg = tiny_train_config(resumed, overrides)
    with pytest.raises(SimulatedKill), kill_at_forward(5):
        train(cfg)
    assert max(by_step(resumed, "loss")) == 2
    train(cfg, resume="auto")
    for key in ("loss", "eval_loss", "eval_loss[ko]", "eval_loss[en]", "eval_loss[sums]"):
        want, got = by_step(reference, key), by_step(resumed, key)
        assert got.keys() == want.keys() and want, key
        assert all(math.isclose(got[s], want[s], rel_tol=1e-6) for s in want), key
    ta = load_file(reference / "adapter_model.safetensors")
    tb = load_file(resumed / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        torch.testing.assert_close(tb[name], ta[name], rtol=1e-6, atol=1e-9, msg=name)
