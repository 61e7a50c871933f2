"""GRPO end to end on the CPU (``train.objective: grpo``), on a tiny Llama over the byte-level mock tokenizer.

The task is verifiable: prompts ``a+b=`` (eight of them, a + b < 10), the reward ``answer`` (the reply's number
equals a + b). The base is a tiny random model warmed up briefly with plain SFT on the *format* only: after each
prompt, a uniformly random digit and EOS. So it starts at chance (about 1 in 10) and knows nothing of sums; what
it learns after that comes from the rewards alone. A GRPO run of 80 steps takes it above 0.9.

Also: a run killed mid-way and resumed samples the same completions (their seeds are a function of the step a
checkpoint holds) and ends with the same rewards and adapter; a reward that raises stops the run naming the row.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from test_resume import SimulatedKill, assert_same_adapter, by_step, kill_at_forward
from unit.conftest import BOS, EOS, PAD, build_mock_tokenizer

from kotune.cli import main
from kotune.config_load import load_config
from kotune.rl.rewards import RewardError
from kotune.run_folder import ADAPTER, METRICS
from kotune.training.checkpoint import latest_good
from kotune.training.recipe import train

WARMUP_STEPS = 100


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the CI machine's cores are shared, and a tiny model's products gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digit_sum_rows() -> list[dict]:
    pairs = [(a, b) for a in range(1, 9) for b in range(1, 9) if a + b < 10]
    random.Random(0).shuffle(pairs)
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs[:8]]


@pytest.fixture(scope="module")
def warm_base(tmp_path_factory) -> tuple[str, Path]:
    """(model folder, prompt file): a tiny Llama (weights' std 0.2, so LoRA can move its logits within a few
    steps) warmed up on ``prompt -> random digit, EOS``: the format, not the sums."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("grpo-base")
    tokenizer = AutoTokenizer.from_pretrained(build_mock_tokenizer(root / "tokenizer"))
    rows = digit_sum_rows()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    digits = torch.Generator().manual_seed(0)
    for _ in range(WARMUP_STEPS):
        ids = torch.tensor([[BOS, *r["prompt"].encode(), 48 + int(torch.randint(10, (1,), generator=digits)), EOS]
                            for r in rows])  # fmt: skip
        labels = ids.clone()
        labels[:, :-2] = -100  # the digit and EOS
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return str(root / "base"), write_jsonl(root / "prompts.jsonl", rows)


def grpo_config(out: Path, base: tuple[str, Path], **overrides):
    model, prompts = base
    values = {
        "model.path": model,
        "model.quantization": "none",
        "model.compute_dtype": "float32",
        "data.path": str(prompts),
        "data.validation_path": str(prompts),
        "data.cutoff_len": 32,
        "data.cache": False,
        "lora.target_modules": "all-linear",
        "lora.alpha": 32,
        "lora.dropout": 0.0,
        "train.objective": "grpo",
        "train.output_dir": str(out),
        "train.micro_batch_size": 4,
        "train.gradient_accumulation_steps": 2,
        "train.optimizer": "adamw_torch",
        "train.learning_rate": 5e-3,
        "train.lr_scheduler": "constant",
        "train.warmup_steps": 0,
        "train.min_free_disk_gb": 0,
        "grpo.generations": 16,
        "grpo.max_new_tokens": 3,
        "grpo.loss_type": "dapo",
        **overrides,
    }
    return load_config(None, [f"{key}={value}" for key, value in values.items()])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def test_grpo_learns_a_digit_sum_from_rewards_alone(tmp_path, warm_base):
    out = tmp_path / "run"
    cfg = grpo_config(out, warm_base, **{"train.max_steps": 80, "train.eval_steps": 40, "train.save_steps": 80,
                                         "train.eval_at_start": True})  # fmt: skip
    train(cfg)
    logged = records(out)
    steps = [r for r in logged if "reward" in r]
    evals = [r["eval_reward"] for r in logged if "eval_reward" in r]
    first, last = steps[:5], steps[-5:]
    mean = lambda rs: sum(r["reward"] for r in rs) / len(rs)  # noqa: E731
    assert mean(first) < 0.3, [r["reward"] for r in first]  # chance is 0.1
    assert mean(last) > 0.9, [r["reward"] for r in last]
    assert evals[0] < 0.5 and evals[-1] >= 0.875, evals  # greedy replies to the 8 prompts: at most 1 wrong
    # the sampler's forward and the training forward agree on the sampled tokens (same weights, fp32, no dropout)
    assert max(r["logp_delta_max"] for r in steps) < 1e-4
    assert all(r["prompts"] == 8 and r["reward"] == r["reward[answer]"] for r in steps)
    assert sum(r["stopped"] for r in last) / 5 > 0.9 and 1.9 < last[-1]["completion_length"] < 2.5  # digit, EOS
    assert (out / ADAPTER).is_file()
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "![Reward (GRPO) and its components](report/reward.png)" in report
    assert f"| last held-out reward | {evals[-1]:.4f} |" in report
    assert (out / "report" / "reward.png").read_bytes()[:4] == b"\x89PNG"
    # kotune eval scores the held-out prompts with the run's rewards, before (--base) and after
    common = ["--limit", "8", "--max-new-tokens", "3"]
    assert main(["eval", str(out), "--base", *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["eval", str(out), *common, "--compare", str(tmp_path / "base")]) == 0
    report = json.loads((out / "eval" / "eval_report.json").read_text(encoding="utf-8"))
    before = json.loads((tmp_path / "base" / "eval_report.json").read_text(encoding="utf-8"))
    assert before["rewards"]["reward"] == evals[0]  # the base's greedy replies, as training's step-0 evaluation
    assert report["rewards"]["reward"] == max(evals) and report["rewards"]["components"]["answer"] == max(evals)
    assert "| reward (8 held-out prompts, greedy) |" in (out / "eval" / "eval_report.md").read_text(encoding="utf-8")


def test_a_killed_grpo_run_resumes_to_the_same_rewards_and_adapter(tmp_path, warm_base):
    """Kill at the 5th training forward (step 3's first pass, after checkpoint-2): the resumed run samples steps
    3-4 as the uninterrupted one did. lora.dropout is set, and GRPO trains without it: the training forward gives
    the sampler's log-probabilities once the adapter is off zero (with dropout they differ by ~1e-2)."""
    overrides = {"train.max_steps": 4, "train.save_steps": 2, "lora.dropout": 0.1, "grpo.generations": 4}
    reference = tmp_path / "reference"
    train(grpo_config(reference, warm_base, **overrides))
    out = tmp_path / "run"
    cfg = grpo_config(out, warm_base, **overrides)
    with pytest.raises(SimulatedKill), kill_at_forward(5):
        train(cfg)
    assert latest_good(out).name == "checkpoint-2"
    train(cfg, resume="auto")
    for key in ("reward", "grad_norm", "completion_length", "logp_delta_mean"):
        assert by_step(out, key) == pytest.approx(by_step(reference, key), rel=1e-6, abs=1e-9), key
    assert_same_adapter(out / ADAPTER, reference / ADAPTER)
    assert max(by_step(reference, "logp_delta_max").values()) < 1e-4


def test_grpo_iterations_resumed_inside_a_group_equal_the_uninterrupted_run(tmp_path, warm_base):
    """grpo.iterations 2: steps 1 and 3 sample, steps 2 and 4 train again on those completions (rewards logged at
    the sampling steps only). Killed at step 4's first forward, after checkpoint-3 (inside the second group): it
    holds the group's samples, and the resumed step 4 trains on them as the uninterrupted run did."""
    overrides = {"train.max_steps": 4, "train.save_steps": 3, "lora.dropout": 0.1, "grpo.generations": 4,
                 "grpo.iterations": 2}  # fmt: skip
    reference = tmp_path / "reference"
    train(grpo_config(reference, warm_base, **overrides))
    assert by_step(reference, "sampled") == {1: True, 2: False, 3: True, 4: False}
    assert sorted(by_step(reference, "reward")) == [1, 3]
    assert by_step(reference, "epoch")[2] == by_step(reference, "epoch")[1]  # the same prompts, not the next ones
    assert by_step(reference, "clip_low")[2] + by_step(reference, "clip_high")[2] > 0  # the ratio left 1
    out = tmp_path / "run"
    cfg = grpo_config(out, warm_base, **overrides)
    with pytest.raises(SimulatedKill), kill_at_forward(7):
        train(cfg)
    assert latest_good(out).name == "checkpoint-3" and (out / "checkpoint-3" / "objective.safetensors").is_file()
    train(cfg, resume="auto")
    for key in ("loss", "grad_norm", "reward", "clip_low", "clip_high", "sampled"):
        assert by_step(out, key) == pytest.approx(by_step(reference, key), rel=1e-6, abs=1e-9), key
    assert_same_adapter(out / ADAPTER, reference / ADAPTER)


def test_the_kl_to_the_adapter_switched_off_starts_at_zero_and_grows(tmp_path, warm_base):
    """grpo.beta > 0: the reference is the base (adapter off). At step 1 LoRA B is still zero, so policy and
    reference agree and the k3 KL is exactly 0; after an update it is positive."""
    out = tmp_path / "run"
    train(grpo_config(out, warm_base, **{"train.max_steps": 3, "grpo.beta": 0.04, "grpo.generations": 4}))
    kl = by_step(out, "kl")
    assert kl[1] == 0.0 and kl[3] > 0.0, kl


def test_a_reward_that_raises_stops_the_run_naming_row_and_function(tmp_path, warm_base, monkeypatch):
    (tmp_path / "strict.py").write_text("def only_digits(completion, row):\n    raise ValueError('unparseable')\n")
    monkeypatch.chdir(tmp_path)
    overrides = {"train.max_steps": 1, "grpo.rewards": "{strict.py:only_digits: 1}", "grpo.generations": 2}
    cfg = grpo_config(tmp_path / "run", warm_base, **overrides)
    with pytest.raises(
        RewardError,
        match=r"reward 'strict.py:only_digits' on prompt row \d raised ValueError: unparseable; the reply was '",
    ):
        train(cfg)


@pytest.mark.slow
def test_two_processes_sample_and_train_the_same_steps_as_one(tmp_path, warm_base):
    """torchrun with two gloo processes, each sampling the completions of its half of a step's prompts: the same
    rewards, gradient norms and |delta log p| maxima (reduced by max over the processes) as one process, and the
    same adapter (the prompts are of one length, so the batches' padding cannot change a sampled token). With
    grpo.iterations 2, step 2 trains again on step 1's completions, and the last checkpoint (step 3, inside a group)
    holds the completions both processes sampled, gathered, as one process's."""
    from test_ddp import kotune

    overrides = {"train.max_steps": 3, "train.save_steps": 3, "grpo.generations": 4, "grpo.iterations": 2}
    path = tmp_path / "config.yaml"
    path.write_text(grpo_config(tmp_path / "unused", warm_base, **overrides).to_yaml(), encoding="utf-8")
    runs = {}
    for n in (1, 2):
        runs[n], log = tmp_path / f"p{n}", tmp_path / f"p{n}.log"
        assert kotune(["train", str(path), f"train.output_dir={runs[n]}"], n, log) == 0, log.read_text()[-4000:]
    every, sampling = [1, 2, 3], [1, 3]
    checked = {"loss": every, "grad_norm": every, "reward": sampling, "completion_length": sampling,
               "logp_delta_max": sampling}  # fmt: skip
    for key, steps in checked.items():
        one, two = by_step(runs[1], key), by_step(runs[2], key)
        assert sorted(one) == steps and two == pytest.approx(one, rel=1e-5, abs=1e-6), key
    assert all(r["processes"] == 2 for r in records(runs[2]) if "loss" in r)
    one, two = (load_file(runs[n] / "checkpoint-3" / "objective.safetensors") for n in (1, 2))
    assert one.keys() == two.keys() and len({k.split("/")[0] for k in one}) == 8  # every prompt of the step
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5)
    one, two = load_file(runs[1] / ADAPTER), load_file(runs[2] / ADAPTER)
    for name in one:  # Adam divides by the gradient's size: a near-zero entry's rounding moves it by ~1e-6, not ~lr
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5)
