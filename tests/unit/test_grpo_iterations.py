"""``grpo.iterations``: a group's later steps train on the completions its first step sampled, the probability
ratio taken against that step's training log-probabilities, so after an update the ratio moves off 1 and clipping
acts. Checked on the objective itself (collate, then the pass the loop runs) with a tiny random model, against
``test_grpo_loss``'s loop-by-loop implementation of the formulas; and the group's samples survive a checkpoint
(``checkpoint_tensors`` / ``restore_tensors``) exactly."""

from __future__ import annotations

import math

import pytest
import torch

from kotune.config_load import load_config
from kotune.data.order import step_start, total_steps
from kotune.data.prompts import PromptRow
from kotune.rl.rewards import RewardSet
from kotune.training.grpo import GrpoObjective

from .conftest import BOS, EOS, ids
from .test_grpo_loss import reference_advantages, reference_step_loss, reference_token_loss

EPS = 0.02
"""Small, so that one update moves some ratios past it."""


@pytest.fixture
def setup(tiny_model_dir, mock_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = load_config(None, ["train.objective=grpo", "grpo.generations=4", "grpo.max_new_tokens=5",
                             "grpo.iterations=2", f"grpo.epsilon={EPS}", "grpo.loss_type=dapo"])  # fmt: skip
    # a reward that differs between completions, so the advantages are not all 0
    rewards = RewardSet([("bytes", lambda text, row: float(sum(map(ord, text)) % 7), 1.0)])
    make = lambda: GrpoObjective(cfg, model, mock_tokenizer, rewards, (EOS,), None)  # noqa: E731
    units = [PromptRow(r, [BOS, *ids(text)], text, {}) for r, text in enumerate(["1+1=", "a longer prompt"])]
    return model, make, units


def test_a_groups_steps_start_at_the_same_prompts_and_an_epoch_takes_iterations_times_the_steps():
    common = ["train.objective=grpo", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2"]
    once, thrice = (load_config(None, [*common, f"grpo.iterations={mu}"]) for mu in (1, 3))
    lengths = [5] * 16  # 8 micro-batches an epoch, 4 steps of new prompts
    assert total_steps(once, lengths, 1) == (4, 8) and total_steps(thrice, lengths, 1) == (12, 8)
    assert [step_start(once, s) for s in range(4)] == [0, 2, 4, 6]
    assert [step_start(thrice, s) for s in range(7)] == [0, 0, 0, 2, 2, 2, 4]
    sft = load_config(None, ["train.micro_batch_size=2", "train.gradient_accumulation_steps=2", "grpo.iterations=3"])
    assert total_steps(sft, lengths, 1) == (4, 8)  # only GRPO reads it


def plain_logps(model, batch) -> torch.Tensor:
    """Each completion token's log-probability by a plain forward (log_softmax), [rows, length - 1], 0 elsewhere."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    picked = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return picked * (labels != -100)


def train_pass(obj, model, batch) -> tuple[float, dict[str, float]]:
    """The step's loss (summed loss / normaliser, one pass) and its extra sums; backpropagates as the loop does."""
    norm = obj.normaliser([], batch)
    loss, extras = obj.pass_sums(model, obj.on_device(batch, torch.device("cpu"), True))
    (loss / norm).backward()
    return loss.item() / norm, dict(zip(obj.extra_keys, [float(e) for e in extras], strict=True))


def reference(batch, logps: torch.Tensor, old: torch.Tensor, group: int) -> tuple[float, int]:
    """(the step's dapo loss, tokens clipped), loop by loop over completions and tokens."""
    advantages = reference_advantages(batch["rewards"].tolist(), group, scale=True)
    losses, lengths, clipped = [], [], 0
    for i, adv in enumerate(advantages):
        positions = (batch["labels"][i, 1:] != -100).nonzero().flatten().tolist()
        row = []
        for t in positions:
            ratio = math.exp(logps[i, t] - old[i, t])
            clipped += (ratio < 1 - EPS and adv < 0) or (ratio > 1 + EPS and adv > 0)
            row.append(reference_token_loss(float(logps[i, t]), float(old[i, t]), 0.0, adv, EPS, EPS, 0.0))
        losses.append(row)
        lengths.append(len(row))
    return reference_step_loss(losses, lengths, "dapo", 5), clipped


def test_the_second_iteration_trains_on_the_same_completions_with_the_ratio_off_one_and_clipping(setup):
    model, make, units = setup
    obj = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    obj.start_step(0)
    obj.prepare([units])  # as the loop does before a step's passes: a sampling step samples here
    first = obj.collate(units, True)
    assert "old_logps" not in first
    old = plain_logps(model, first)  # the sampling policy's log-probs, before the update
    loss0, sums0 = train_pass(obj, model, first)
    want0, clipped0 = reference(first, old, old, 4)
    assert loss0 == pytest.approx(want0, rel=1e-5, abs=1e-7)
    assert sums0["sampled"] == 1 and sums0["clip_low"] + sums0["clip_high"] == clipped0 == 0  # ratio 1
    optimizer.step()
    optimizer.zero_grad()

    obj.start_step(1)
    obj.prepare([units])  # a group's later step: nothing to sample
    second = obj.collate(units, True)
    for key in ("input_ids", "labels", "rewards", "advantages"):
        assert torch.equal(second[key], first[key]), key  # the same completions, scored as before
    assert second["old_logps"][:, 1:] == pytest.approx(old.float(), abs=1e-5)
    new = plain_logps(model, second)
    mask = second["labels"][:, 1:] != -100
    assert (new - old)[mask].abs().max() > 5 * EPS  # the update moved the policy: the ratio is not 1
    loss1, sums1 = train_pass(obj, model, second)
    want1, clipped1 = reference(second, new, old, 4)
    assert loss1 == pytest.approx(want1, rel=1e-4, abs=1e-6)
    assert sums1["sampled"] == 0 and sums1["clip_low"] + sums1["clip_high"] == clipped1 > 0
    record = obj.record(sums1, 2)
    assert not record["sampled"] and "reward" not in record and record["clip_low"] + record["clip_high"] > 0

    obj.start_step(2)  # the next group samples afresh
    obj.prepare([units])
    third = obj.collate(units, True)
    assert "old_logps" not in third and not torch.equal(third["input_ids"], first["input_ids"])


def test_a_groups_samples_come_back_from_a_checkpoint_exactly(setup):
    model, make, units = setup
    obj = make()
    obj.start_step(0)
    obj.prepare([units])  # as the loop does before a step's passes: a sampling step samples here
    first = obj.collate(units, True)
    train_pass(obj, model, first)
    assert obj.checkpoint_tensors(2) == {}  # the end of the group: the next step samples
    saved = obj.checkpoint_tensors(1)
    resumed = make()
    resumed.restore_tensors({k: v.clone() for k, v in saved.items()}, 1)
    obj.start_step(1)
    resumed.start_step(1)
    obj.prepare([units]), resumed.prepare([units])
    want, got = obj.collate(units, True), resumed.collate(units, True)
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
