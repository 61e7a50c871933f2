"""GRPO (``train.objective: grpo``) for the one loop: prompts in, the same adapter out.

A step's units are prompts (``micro_batch_size`` a pass, ``gradient_accumulation_steps`` passes, split over the
processes as any units are). A pass's ``collate`` samples ``grpo.generations`` completions of each of its prompts
from the model being trained (``rl.rollout``), scores them (``rl.rewards``) and makes each completion's advantage
relative to its group; ``pass_sums`` runs the training forward over prompt + completion and returns the policy loss
(``rl.loss``). The loop divides the step's summed loss by the aggregation's normaliser over the whole step.

Each step logs the reward (mean, std, each component), completion length, the share of completions that stopped,
the share of tokens clipped low and high, the KL (with ``grpo.beta``), and the mean and max |log p| difference
between the sampler's forward and the training forward on the sampled tokens. An evaluation samples one greedy
completion of each held-out prompt: ``eval_reward`` and its components; ``eval_loss`` is minus the mean reward, so
the best evaluated adapter (``train.load_best_model_at_end``) is the one with the highest reward.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch

from kotune.config import Config
from kotune.data.examples import IGNORE
from kotune.data.prompts import PromptRow
from kotune.inference.generate import completion_text
from kotune.rl.loss import group_advantages, k3, normaliser, pass_loss, token_losses
from kotune.rl.rewards import RewardSet
from kotune.rl.rollout import Completion, Sampler, completion_seed, rollout
from kotune.training.objective import Objective
from kotune.training.objectives import StartWeights, token_logps


def completion_batch(
    prompts: list[list[int]], completions: list[Completion], pad_id: int, trained: list[bool]
) -> dict[str, torch.Tensor]:
    """Prompt + completion per row, right-padded: labels on the completion tokens of ``trained`` rows (-100
    elsewhere), and the sampler's log-probability at each labelled position."""
    width = max(len(p) + len(c.ids) for p, c in zip(prompts, completions, strict=True))
    n = len(prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    sampled = torch.zeros((n, width), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        end = len(p) + len(c.ids)
        ids[i, :end] = torch.tensor(p + c.ids)
        mask[i, :end] = 1
        if trained[i]:
            labels[i, len(p) : end] = torch.tensor(c.ids)
        sampled[i, len(p) : end] = torch.tensor(c.logps)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sampled_logps": sampled}


class GrpoObjective(Objective):
    """GRPO / Dr. GRPO / DAPO on prompt rows (``grpo`` settings). ``start``: the starting adapter's weights, the KL
    reference of a run from ``model.adapter`` (None: the base, the adapter switched off)."""

    name = "grpo"
    unit = "prompts"
    fault_hint = ", or grpo.beta"
    max_keys = ("logp_delta_max",)

    def __init__(self, cfg: Config, peft_model, tokenizer, rewards: RewardSet, stop_ids, start: StartWeights | None):
        self.cfg, self.g, self.model, self.tokenizer = cfg, cfg.grpo, peft_model, tokenizer
        self.rewards, self.start = rewards, start
        self.components = [f"reward[{name}]" for name in rewards.names]
        self.extra_keys = (
            "completions", "reward", "reward_sq", *self.components, "completion_tokens", "loss_tokens", "stopped",
            "logp_delta", "logp_delta_max", "clip_low", "clip_high", "kl",
        )  # fmt: skip
        g = self.g
        self.sampler = Sampler(tokenizer.pad_token_id, tuple(stop_ids), tuple(g.stop), g.max_new_tokens,
                               g.temperature, g.top_p)  # fmt: skip
        self.step = 0

    def start_step(self, step: int) -> None:
        self.step = step  # seeds this step's completions (rl.rollout.completion_seed)

    def collate(self, units: list[PromptRow], train: bool) -> dict[str, torch.Tensor]:
        group = self.g.generations if train else 1
        prompts = [u.ids for u in units for _ in range(group)]
        seeds = [completion_seed(self.cfg.train.seed, self.step, u.row, k) for u in units for k in range(group)]
        sampler = self.sampler if train else replace(self.sampler, temperature=0.0)  # evaluations: greedy
        completions = rollout(self.model, self.tokenizer, prompts, seeds, sampler)
        texts = [completion_text(self.tokenizer, c.ids) for c in completions]
        totals, parts = self.rewards.score(texts, [u.fields for u in units for _ in range(group)])
        trained = [c.stopped or not self.g.mask_truncated for c in completions]
        batch = completion_batch(prompts, completions, self.sampler.pad_id, trained)
        rewards = torch.tensor(totals, dtype=torch.float32)
        batch["rewards"] = rewards
        batch["components"] = torch.tensor([parts[n] for n in self.rewards.names], dtype=torch.float32).T
        if train:
            batch["advantages"] = group_advantages(rewards, group, self.g.scale_rewards)
        batch["stopped"] = torch.tensor([c.stopped for c in completions], dtype=torch.float32)
        batch["lengths"] = torch.tensor([len(c.ids) for c in completions], dtype=torch.float32)
        return batch

    def normaliser(self, units: list, batch: dict[str, torch.Tensor]) -> float:
        if "advantages" not in batch:  # an evaluation: the mean over its completions
            return float(len(batch["rewards"]))
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
        return normaliser(self.g.loss_type, len(batch["rewards"]), tokens, self.g.max_new_tokens)

    def pass_sums(self, forward, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rewards, mask = batch["rewards"], (batch["labels"][:, 1:] != IGNORE)
        zero = rewards.new_zeros(())
        stats = [
            rewards.new_tensor(float(len(rewards))),
            rewards.sum(),
            (rewards**2).sum(),
            *batch["components"].sum(0),
            batch["lengths"].sum(),
            mask.sum().float(),
            batch["stopped"].sum(),
        ]
        if "advantages" not in batch:  # an evaluation scores the greedy completions: minus the reward is its loss
            return -rewards.sum(), [*stats, zero, zero, zero, zero, zero]
        g = self.g
        # the reference pass first: swapping weights in and out after the policy's forward would invalidate what
        # autograd saved for its backward
        ref = self.reference_logps(batch) if g.beta else None
        logps = token_logps(forward, batch, g.temperature)
        high_eps = g.epsilon if g.epsilon_high is None else g.epsilon_high
        loss, low, high = token_losses(logps, logps.detach(), batch["advantages"], g.epsilon, high_eps, g.beta, ref)
        delta = (logps.detach() - batch["sampled_logps"][:, 1:]).abs() * mask
        kl = (k3(logps.detach(), ref) * mask).sum() if ref is not None else zero
        extras = [delta.sum(), delta.max() if mask.any() else zero, (low & mask).sum(), (high & mask).sum(), kl]
        return pass_loss(loss, mask.float(), g.loss_type), [*stats, *extras]

    def reference_logps(self, batch: dict) -> torch.Tensor:
        """Token log-probs under the reference, without gradients: the starting adapter (``start``) or the base."""
        if self.start is not None:
            switch = self.start.swapped_in(self.model)
        else:
            switch = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), switch:
                return token_logps(self.model, batch, self.g.temperature)
        finally:
            self.model.train(training)

    def record(self, sums: dict[str, float], units: float) -> dict[str, Any]:
        n, tokens = max(1.0, sums["completions"]), max(1.0, sums["loss_tokens"])
        mean = sums["reward"] / n
        out = {
            "prompts": int(round(sums["completions"] / self.g.generations)),
            "reward": mean,
            "reward_std": math.sqrt(max(0.0, sums["reward_sq"] / n - mean**2)),
            **{key: sums[key] / n for key in self.components},
            "completion_length": sums["completion_tokens"] / n,
            "stopped": sums["stopped"] / n,
            "logp_delta_mean": sums["logp_delta"] / tokens,
            "logp_delta_max": sums["logp_delta_max"],
            "clip_low": sums["clip_low"] / tokens,
            "clip_high": sums["clip_high"] / tokens,
        }
        if self.g.beta:
            out["kl"] = sums["kl"] / tokens
        return out

    def eval_record(self, loss: float, sums: dict[str, float], units: float) -> dict[str, Any]:
        n = max(1.0, sums["completions"])
        return {
            "eval_loss": loss,
            "eval_reward": sums["reward"] / n,
            **{f"eval_{key}": sums[key] / n for key in self.components},
            "eval_completion_length": sums["completion_tokens"] / n,
        }
