"""GRPO's policy loss, as plain tensor functions: group advantages, the clipped ratio objective per token, the k3 KL
estimate to a reference, and the three ways token losses make the step's loss.

Papers: GRPO, Shao et al. 2024 (DeepSeekMath, eq. 3 and the k3 estimator of Schulman 2020); Dr. GRPO, Liu et al.
2025 (no length or std normalisation); DAPO, Yu et al. 2025 (clip-higher, token-level loss, overlong filtering).
``tests/unit/test_grpo_loss.py`` checks each against a loop-by-loop implementation written from those formulas.

The loop divides a step's summed loss by a normaliser over the whole step (all processes): ``pass_loss`` gives a
pass's sum and ``normaliser`` its share, so the aggregations hold whatever the accumulation and the processes.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4
"""Added to a group's reward standard deviation before dividing by it (TRL's value)."""


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> torch.Tensor:
    """Each completion's reward minus its group's mean (``group`` consecutive completions of one prompt), divided
    by the group's standard deviation (unbiased, + ``STD_EPS``) when ``scale``. Equal rewards give 0."""
    r = rewards.view(-1, group)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (r.std(dim=1, keepdim=True) + STD_EPS)
    return advantages.reshape(-1)


def k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(policy || reference) per token: exp(r) - r - 1 with r = ref - policy (>= 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token [completions, tokens]: -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3, with
    ratio = exp(logps - old_logps) and A the completion's advantage; also the masks of tokens clipped low (ratio
    below 1 - eps_low, A < 0) and high (ratio above 1 + eps_high, A > 0), where the gradient is zero."""
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * a, clipped * a)
    if beta:
        loss = loss + beta * k3(logps, ref_logps)
    low = (ratio < 1 - eps_low) & (a < 0)
    high = (ratio > 1 + eps_high) & (a > 0)
    return loss, low, high


def pass_loss(loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """A pass's share of the step's summed loss (``mask``: the completion tokens that count): ``grpo`` sums each
    completion's token mean; ``dr_grpo`` and ``dapo`` sum all tokens (their normalisers differ)."""
    summed = (loss * mask).sum(-1)
    if loss_type == "grpo":
        return (summed / mask.sum(-1).clamp(min=1)).sum()
    return summed.sum()


def normaliser(loss_type: str, completions: int, tokens: int, max_new_tokens: int) -> float:
    """A pass's share of what the step's summed loss is divided by: completions (``grpo``), completions x
    ``max_new_tokens`` (``dr_grpo``), or completion tokens (``dapo``)."""
    if loss_type == "grpo":
        return float(completions)
    if loss_type == "dr_grpo":
        return float(completions * max_new_tokens)
    return float(tokens)
