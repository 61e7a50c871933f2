"""GRPO's loss (``kotune.rl.loss``) against a loop-by-loop implementation written from the papers' formulas
(GRPO eq. 3 with the k3 KL estimate; Dr. GRPO; DAPO's clip-higher and token-level loss), in plain Python floats:
equal rewards in a group give zero advantage and no policy gradient; clipped tokens carry no gradient, on the low
and the high side; each aggregation, over a step split into passes as the loop splits it."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kotune.rl.loss import STD_EPS, group_advantages, k3, normaliser, pass_loss, token_losses


def reference_advantages(rewards: list[float], group: int, scale: bool) -> list[float]:
    out = []
    for start in range(0, len(rewards), group):
        g = rewards[start : start + group]
        mean = sum(g) / len(g)
        std = math.sqrt(sum((r - mean) ** 2 for r in g) / (len(g) - 1))
        out += [(r - mean) / (std + STD_EPS) if scale else r - mean for r in g]
    return out


def reference_token_loss(logp, old, ref, adv, eps_low, eps_high, beta) -> float:
    ratio = math.exp(logp - old)
    clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
    loss = -min(ratio * adv, clipped * adv)
    kl = math.exp(ref - logp) - (ref - logp) - 1
    return loss + beta * kl


def reference_step_loss(losses: list[list[float]], lengths: list[int], loss_type: str, max_new: int) -> float:
    """The step's loss from per-token losses of every completion (``lengths``: its real tokens)."""
    kept = [row[:n] for row, n in zip(losses, lengths, strict=True)]
    if loss_type == "grpo":
        return sum(sum(row) / max(1, len(row)) for row in kept) / len(kept)
    total = sum(sum(row) for row in kept)
    if loss_type == "dr_grpo":
        return total / (len(kept) * max_new)
    return total / sum(len(row) for row in kept)


def test_advantages_by_hand_and_against_the_reference():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale=True)
    assert adv.tolist() == pytest.approx([0.75 / (0.5 + STD_EPS), *[-0.25 / (0.5 + STD_EPS)] * 3])
    rng = random.Random(0)
    rewards = [rng.choice([0.0, 0.5, 1.0]) for _ in range(12)]
    for scale in (True, False):
        got = group_advantages(torch.tensor(rewards), 4, scale).tolist()
        assert got == pytest.approx(reference_advantages(rewards, 4, scale), abs=1e-6)


def test_equal_rewards_give_zero_advantage_and_no_policy_gradient():
    adv = group_advantages(torch.tensor([0.7] * 4 + [0.0, 1.0, 1.0, 0.0]), 4, scale=True)
    assert adv[:4].tolist() == [0.0] * 4 and adv[4:].abs().min() > 0.5
    logps = torch.randn(8, 5, requires_grad=True)
    loss, _, _ = token_losses(logps, logps.detach(), adv, 0.2, 0.2)
    pass_loss(loss, torch.ones(8, 5), "grpo").backward()
    assert logps.grad[:4].abs().max() == 0  # the equal group: nothing to learn from
    assert logps.grad[4:].abs().min() > 0


@pytest.mark.parametrize(("eps_low", "eps_high", "beta"), [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 0.04)])
def test_token_losses_match_the_formula(eps_low, eps_high, beta):
    gen = torch.Generator().manual_seed(1)
    logps = -torch.rand(6, 4, generator=gen, dtype=torch.float64) * 3
    old = logps + (torch.rand(6, 4, generator=gen, dtype=torch.float64) - 0.5) * 0.8  # ratios around 0.67-1.5
    ref = logps + (torch.rand(6, 4, generator=gen, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0], dtype=torch.float64)
    loss, low, high = token_losses(logps, old, adv, eps_low, eps_high, beta, ref)
    for i in range(6):
        for t in range(4):
            want = reference_token_loss(logps[i, t], old[i, t], ref[i, t], adv[i], eps_low, eps_high, beta)
            assert loss[i, t].item() == pytest.approx(float(want), rel=1e-12)
            ratio = math.exp(logps[i, t] - old[i, t])
            assert low[i, t].item() == (ratio < 1 - eps_low and adv[i] < 0)
            assert high[i, t].item() == (ratio > 1 + eps_high and adv[i] > 0)
    assert low.any() and high.any()  # the draw exercises both sides


def test_clipped_tokens_carry_no_gradient_low_and_high():
    # ratios 1.5 and 0.5 with each sign of advantage, eps 0.2 (low) / 0.28 (high)
    old = torch.zeros(4, 1, dtype=torch.float64)
    logps = torch.tensor([[math.log(1.5)], [math.log(1.5)], [math.log(0.5)], [math.log(0.5)]], dtype=torch.float64)
    logps.requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    loss, low, high = token_losses(logps, old, adv, 0.2, 0.28)
    loss.sum().backward()
    # A > 0, ratio above 1 + eps_high: clipped (the update would push it further); A < 0, ratio below 1 - eps_low
    assert high[:, 0].tolist() == [True, False, False, False] and low[:, 0].tolist() == [False, False, False, True]
    assert logps.grad[0, 0] == 0 and logps.grad[3, 0] == 0
    # the pessimistic side is not clipped: gradient -A * ratio
    assert logps.grad[1, 0].item() == pytest.approx(1.5) and logps.grad[2, 0].item() == pytest.approx(-0.5)
    assert loss[0, 0].item() == pytest.approx(-1.28) and loss[3, 0].item() == pytest.approx(0.8)


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
    logps = torch.tensor([-1.0, -2.0, -0.5])
    assert k3(logps, logps).tolist() == [0.0, 0.0, 0.0]
    assert (k3(logps, logps + torch.tensor([0.3, -0.3, 1.0])) > 0).all()
    assert k3(torch.tensor([-1.0]), torch.tensor([-1.5])).item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_aggregations_over_passes_match_the_step_formula(loss_type):
    """Six completions of different lengths in two passes (as accumulation splits them): the loop's sum of
    ``pass_loss`` over the sum of ``normaliser`` is the paper's loss over the whole step."""
    gen = torch.Generator().manual_seed(2)
    max_new = 5
    losses = torch.randn(6, max_new, generator=gen, dtype=torch.float64)
    lengths = [5, 1, 3, 2, 5, 4]
    mask = torch.tensor([[float(t < n) for t in range(max_new)] for n in lengths], dtype=torch.float64)
    total, norm = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 6)):
        total += pass_loss(losses[rows], mask[rows], loss_type).item()
        norm += normaliser(loss_type, int(mask[rows].shape[0]), int(mask[rows].sum()), max_new)
    want = reference_step_loss(losses.tolist(), lengths, loss_type, max_new)
    assert total / norm == pytest.approx(want, rel=1e-12)


def test_aggregations_differ_as_the_papers_say():
    """One long and one short completion with the same per-token loss: ``grpo`` weighs each completion alike (the
    short one's tokens weigh more), ``dapo`` each token alike, ``dr_grpo`` by a constant."""
    losses = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    step = {t: pass_loss(losses, mask, t).item() / normaliser(t, 2, 5, 4) for t in ("grpo", "dr_grpo", "dapo")}
    assert step == pytest.approx({"grpo": (1 + 3) / 2, "dr_grpo": 7 / 8, "dapo": 7 / 5})
