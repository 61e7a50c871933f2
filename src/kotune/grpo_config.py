"""The ``grpo`` section of the config: settings of online RL with group-relative advantages (``train.objective:
grpo``).

A step takes ``train.micro_batch_size x train.gradient_accumulation_steps`` prompts (all processes), samples
``generations`` completions of each with the adapter on, scores them with ``rewards`` and trains on the
completions with advantages relative to their group (with ``iterations`` > 1, for that many steps). Names follow
TRL's ``GRPOConfig`` where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kotune.errors import KotuneError


@dataclass
class GrpoConfig:
    generations: int = 8
    """Completions sampled per prompt (the group whose rewards the advantages are relative to; TRL's
    ``num_generations``). Prompts per step are ``train.micro_batch_size x train.gradient_accumulation_steps``."""
    max_new_tokens: int = 256
    """Most tokens a completion may have; it stops earlier at EOS, an end-of-turn token or a ``stop`` string."""
    temperature: float = 1.0
    """Sampling temperature of the completions; the training forward divides its logits by it too, so the
    log-probabilities trained are those of the distribution sampled."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probabilities add up to this (1 = all)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (kept in it), besides EOS and the end-of-turn token, e.g. ``</answer>``."""
    iterations: int = 1
    """Optimizer steps on each batch of sampled completions (TRL's ``num_iterations``, the GRPO paper's mu). A step
    is still one update (``train.max_steps``, ``save_steps``, ``eval_steps`` and the log count updates): steps
    whose number is a multiple of this sample, and the next ``iterations - 1`` train on the same prompts' same
    completions, their probability ratio taken against the log-probabilities of the policy that sampled them (so
    clipping acts). Each epoch's prompts then take ``iterations`` times as many steps."""
    epsilon: float = 0.2
    """Clipping of the probability ratio from below: the ratio counts down to 1 - epsilon (PPO's epsilon)."""
    epsilon_high: float | None = None
    """Clipping from above, up to 1 + epsilon_high (DAPO's clip-higher, paper: 0.28); unset: ``epsilon``."""
    beta: float = 0.0
    """Weight of the KL penalty to the reference, the base with the adapter switched off (or the starting adapter
    of a run from ``model.adapter``), estimated per token with k3; 0 (DAPO, Dr. GRPO) skips the reference pass."""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """How token losses make the step's loss: ``grpo``, each completion's token mean, then the mean over
    completions; ``dr_grpo``, the sum over all tokens divided by completions x ``max_new_tokens`` (no length
    bias); ``dapo``, the mean over all the step's completion tokens (token-level)."""
    scale_rewards: bool = True
    """Divide each advantage by its group's reward standard deviation (GRPO); off as Dr. GRPO recommends."""
    mask_truncated: bool = False
    """Overlong filtering (DAPO): completions cut by ``max_new_tokens`` before they stopped carry no loss."""
    rewards: dict[str, float] = field(default_factory=lambda: {"answer": 1.0})
    """Reward functions and their weights; the reward is the weighted sum. Built in: ``answer`` (the final answer
    equals ``answer_column``, numbers and ``\\boxed{}`` normalised), ``format`` (``<think>...</think>`` then
    ``<answer>...</answer>``), ``korean`` (the share of Hangul among the reply's letters), ``length`` (minus the
    share by which the reply exceeds ``length_target`` characters, at most 1). Your own: ``path/to/file.py:name``,
    a function ``name(completion: str, row: dict) -> float``."""
    answer_column: str = "answer"
    """The prompt rows' column holding the reference answer ``answer`` compares with."""
    length_target: int = 512
    """Characters a reply may have before ``length`` penalises it."""


class GrpoConfigError(KotuneError, ValueError):
    """A GRPO setting out of range; the message names the key."""

    refusal = True


def validate_grpo(g: GrpoConfig) -> None:
    """Ranges of the GRPO settings; errors name the key."""
    if g.generations < 2:  # one completion is its own group: its advantage is always 0
        raise GrpoConfigError(f"'grpo.generations' must be at least 2, got {g.generations}")
    positive = {"max_new_tokens": g.max_new_tokens, "length_target": g.length_target, "iterations": g.iterations}
    for key, value in positive.items():
        if value <= 0:
            raise GrpoConfigError(f"'grpo.{key}' must be positive, got {value}")
    if g.temperature <= 0:
        raise GrpoConfigError(f"'grpo.temperature' must be positive (sampling needs it), got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise GrpoConfigError(f"'grpo.top_p' must be in (0, 1], got {g.top_p}")
    if not 0 <= g.epsilon < 1:
        raise GrpoConfigError(f"'grpo.epsilon' must be in [0, 1), got {g.epsilon}")
    if g.epsilon_high is not None and g.epsilon_high < 0:
        raise GrpoConfigError(f"'grpo.epsilon_high' must not be negative, got {g.epsilon_high}")
    if g.beta < 0:
        raise GrpoConfigError(f"'grpo.beta' must not be negative, got {g.beta}")
    if not g.rewards:
        raise GrpoConfigError("'grpo.rewards' names no reward function; e.g. {answer: 1.0}")
