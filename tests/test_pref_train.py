"""Preference runs end to end on the tiny Llama (CPU, in process): each objective trains and writes the run
folder; DPO from an SFT run's adapter starts at ln 2 (its reference is that starting model) and logs the
preference metrics; the model card names the objective."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from kotune.run_folder import ADAPTER, METRICS, open_folder, read_summary
from kotune.training.recipe import train

PAIRS = [
    {
        "instruction": f"질문 {i}: 하늘은 왜 파란가요?",
        "input": "과학" if i % 2 else "",
        "chosen": f"답변 {i}: 햇빛이 공기에 산란하기 때문입니다.",
        "rejected": f"모름 {i}",
    }
    for i in range(24)
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


def _records(folder):
    return [json.loads(line) for line in (folder / METRICS).read_text().splitlines()]


def _preference_overrides(pairs_file, objective: str, **extra):
    return {
        "data.path": str(pairs_file),
        "data.val_size": 0.25,
        "train.objective": objective,
        "preference.max_prompt_len": 96,
        "lora.dropout": 0.0,
        "train.max_steps": 3,
        "train.eval_steps": 3,
        "train.learning_rate": 5e-3,
        "data.cache": False,
        **extra,
    }


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo", "kto"])
def test_each_objective_trains_and_writes_the_run(tmp_path, tiny_train_config, pairs_file, objective):
    out = tmp_path / objective
    train(tiny_train_config(out, _preference_overrides(pairs_file, objective)))
    records = _records(out)
    steps = [r for r in records if "reward_accuracy" in r]
    evals = [r for r in records if "eval_reward_accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and len(evals) == 1
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps)
    assert {"reward_margin", "logps_chosen", "logps_rejected", "rewards_chosen"} <= set(steps[0])
    lora_b = [v for k, v in load_file(out / ADAPTER).items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: the objective moved it


def test_non_finite_preference_steps_stop_the_run(tmp_path, tiny_train_config, pairs_file):
    """A learning rate that blows the adapter up: the steps after the first are non-finite, skipped, and the
    run stops after ``max_bad_steps`` of them, as an SFT run does, instead of saving an adapter it never updated."""
    from kotune.training.loop import NonFiniteLoss

    overrides = {"train.learning_rate": 1e30, "train.max_steps": 6, "train.max_bad_steps": 2, "train.warmup_steps": 0}
    cfg = tiny_train_config(tmp_path / "run", _preference_overrides(pairs_file, "dpo", **overrides))
    with pytest.raises(NonFiniteLoss, match="2 consecutive steps with a non-finite loss .* the last at step 3"):
        train(cfg)
    steps = [r for r in _records(tmp_path / "run") if "reward_accuracy" in r]
    assert [r["skipped"] for r in steps] == [False, True]  # the stopping step is not logged, as in an SFT run


def test_dpo_from_an_sft_adapter(tmp_path, tiny_train_config, pairs_file):
    from kotune.export.card import model_card

    sft = tmp_path / "sft"
    train(tiny_train_config(sft, {"lora.dropout": 0.0, "train.max_steps": 2, "data.cache": False}))
    dpo = tmp_path / "dpo"
    cfg = tiny_train_config(
        dpo, _preference_overrides(pairs_file, "dpo", **{"model.adapter": str(sft), "train.eval_at_start": True})
    )
    train(cfg)
    records = _records(dpo)
    first_eval, first_step = records[0], records[1]
    # policy = reference (the SFT model) before any update: -log sigmoid(0) = ln 2, rewards 0
    assert first_eval["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first_step["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first_step["rewards_chosen"] == pytest.approx(0, abs=1e-5)
    start, end = load_file(sft / ADAPTER), load_file(dpo / ADAPTER)
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)
    card = model_card(open_folder(dpo), "someone/tiny-dpo")
    assert "dpo (beta 0.1, loss sigmoid, label smoothing 0.0)" in card and str(sft) in card


def test_merge_verifies_a_preference_run_on_its_chosen_responses(tmp_path, tiny_train_config, pairs_file):
    """merge reads a run's validation rows again; for a preference run they are the chosen responses."""
    from transformers import AutoTokenizer

    from kotune.data.examples import IGNORE
    from kotune.export.merge import verification_rows

    out = tmp_path / "orpo"
    train(tiny_train_config(out, _preference_overrides(pairs_file, "orpo", **{"train.max_steps": 1})))
    folder = open_folder(out)
    assert folder.fmt == "alpaca"  # prompts as the ko-alpaca template built them, for chat / generate
    tokenizer = AutoTokenizer.from_pretrained(out)
    split, rows = verification_rows(folder, tokenizer, 3)
    assert split == "validation" and len(rows) == 3
    chosen = {p["chosen"] for p in PAIRS}
    for row in rows:
        labels = [t for t in row.labels if t != IGNORE]
        assert tokenizer.decode(labels, skip_special_tokens=True) in chosen


PROMPT = "질문 {}: 하늘은 왜 파란가요?\n답변:"
UNPAIRED = [
    {"prompt": PROMPT.format(i), "completion": f" 답변 {i}: 햇빛이 산란하기 때문입니다.", "label": True}
    for i in range(12)
] + [{"prompt": PROMPT.format(i), "completion": f" 모름 {i}", "label": False} for i in range(12)]


def test_kto_trains_on_unpaired_rows_and_other_objectives_refuse_them(tmp_path, tiny_train_config):
    """Rows of prompt / completion / label train KTO (one response each; metrics per label), merge verifies on
    the completions; DPO refuses them by name before any model loads."""
    from transformers import AutoTokenizer

    from kotune.data.read import DataError
    from kotune.export.merge import verification_rows

    rows = write_jsonl(tmp_path / "unpaired.jsonl", UNPAIRED)
    out = tmp_path / "kto"
    train(tiny_train_config(out, _preference_overrides(rows, "kto", **{"preference.kto_undesirable_weight": 1.2})))
    records = _records(out)
    steps = [r for r in records if "reward_accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in steps)
    # policy = reference at the first step: each response's loss is lambda_y (1 - sigmoid(0)) = lambda_y / 2,
    # 0.5 for desirable and 0.6 for undesirable ones
    assert 0.5 <= steps[0]["loss"] <= 0.6 and steps[0]["rewards_chosen"] == pytest.approx(0, abs=1e-6)
    assert len([r for r in records if "eval_reward_accuracy" in r]) == 1
    assert read_summary(out)["train_pairs"] == 18  # 24 responses, a quarter held out
    _, verify = verification_rows(open_folder(out), AutoTokenizer.from_pretrained(out), 2)
    assert len(verify) == 2
    with pytest.raises(DataError, match="only train.objective=kto"):
        train(tiny_train_config(tmp_path / "dpo", _preference_overrides(rows, "dpo")))


def test_a_killed_dpo_run_resumes_to_the_same_metrics_and_adapter(tmp_path, tiny_train_config, pairs_file):
    """Killed mid-window of step 3 (after checkpoint-2 and the eval at 2), resumed with --resume: the same losses,
    preference metrics and adapters as an uninterrupted run, LoRA dropout on (so the RNG state must carry over)."""
    from test_resume import SimulatedKill, assert_same_adapter, kill_at_forward

    from kotune.training.checkpoint import latest_good

    overrides = {"lora.dropout": 0.1, "train.max_steps": 4, "train.eval_steps": 2, "train.save_steps": 2}
    reference, run = tmp_path / "reference", tmp_path / "run"
    train(tiny_train_config(reference, _preference_overrides(pairs_file, "dpo", **overrides)))
    cfg = tiny_train_config(run, _preference_overrides(pairs_file, "dpo", **overrides))
    with pytest.raises(SimulatedKill), kill_at_forward(6):  # two micro-batches a step: forward 6 is in step 3
        train(cfg)
    assert latest_good(run).name == "checkpoint-2"
    train(cfg, resume="auto")
    got, want = _records(run), _records(reference)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "eval_loss", "eval_reward_margin"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (b["step"], key)
    assert_same_adapter(run / ADAPTER, reference / ADAPTER)
    assert_same_adapter(run / "best" / ADAPTER, reference / "best" / ADAPTER)


def test_the_fast_path_trains_the_same_dpo_steps_as_the_plain_path(tmp_path, tiny_train_config, pairs_file):
    """The one loop with the DPO objective on the fast path (forced on here: on CPU ``train.kernels: auto`` leaves
    it off), the pairs packed and log-probs by the chunked kernel, against the plain path from the same initial
    adapter."""
    from kotune import fast
    from kotune.data.prepare_pairs import prepare_pairs
    from kotune.model.load import load_tokenizer
    from kotune.training.build import TrainingModel, load_for_training
    from kotune.training.loop import Fit
    from kotune.training.preference import PreferenceObjective

    cfg = tiny_train_config(tmp_path, _preference_overrides(pairs_file, "dpo", **{"train.micro_batch_size": 2}))
    tokenizer = load_tokenizer(cfg.model.path, cfg.model)
    data = prepare_pairs(cfg, tokenizer)
    records = []
    for use_fast in (False, True):
        # on CUDA, loading with kernels on builds the fast model (and moves the embedding table to the host)
        kernels = replace(cfg.train, kernels="auto" if use_fast else "off")
        loaded = load_for_training(replace(cfg, train=kernels), cfg.model.path)
        peft = loaded.peft
        model = loaded if loaded.fast is not None or not use_fast else TrainingModel(peft, fast.build(peft, cfg))
        objective = PreferenceObjective(cfg, peft, tokenizer.pad_token_id, False, use_fast, None)
        fit = Fit(cfg, model, objective, data.train, data.validation, tmp_path)
        for _ in range(3):
            fit.step()
        records.append(fit.settle(3) + [fit.evaluate()])
    plain, packed = records
    assert plain[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(packed, plain, strict=True):
        for key in b:
            if key not in ("skipped", "lr", "pairs", "step", "input_tokens", "epoch"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
