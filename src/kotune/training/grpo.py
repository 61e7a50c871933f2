"""GRPO (``train.objective: grpo``) for the one loop: prompts in, the same adapter out.

A step's units are prompts (``micro_batch_size`` a pass, ``gradient_accumulation_steps`` passes, split over the
processes as any units are). Before its passes, a step samples ``grpo.generations`` completions of each of its
prompts (each process its own) in one batch from the model being trained (``rl.rollout``), scores them
(``rl.rewards``) and makes each completion's advantage relative to its group; ``pass_sums`` runs the training
forward over prompt + completion and returns the policy loss (``rl.loss``). The loop divides the step's summed loss
by the aggregation's normaliser over the whole step.

With ``grpo.iterations`` = mu > 1, only steps whose number is a multiple of mu sample: the mu steps of a group
start at the same prompts (the loop moves on in the data order once a group: ``data.order.step_start``), the
objective keeps what the first step sampled (``rl.samples``, with that step's training log-probabilities, the "old"
policy of the ratio) and the later steps train on it again; a checkpoint inside a group holds those samples.

Each step logs whether it ``sampled``, the share of tokens clipped low and high and the KL (with ``grpo.beta``); a
sampling step also the seconds it spent sampling (``rollout_s``, all passes and processes), its completions'
reward (mean, std, each component), length, the share that stopped, and the mean and max |log p| difference
between the sampler's forward and the training forward on the sampled tokens.

An evaluation samples one greedy completion of each held-out prompt: ``eval_reward`` and its components;
``eval_loss`` is minus the mean reward, so the best evaluated adapter (``train.load_best_model_at_end``) is the one
with the highest reward.
"""

from __future__ import annotations

import math
import time
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
from kotune.rl.samples import Sample, flatten, unflatten
from kotune.training import dist
from kotune.training.checkpoint import CheckpointError
from kotune.training.objective import Objective
from kotune.training.objectives import StartWeights, fast_module, reference_of, token_logps


def completion_batch(
    prompts: list[list[int]],
    completions: list[Completion],
    pad_id: int,
    trained: list[bool],
    old: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prompt + completion per row, right-padded: labels on the completion tokens of ``trained`` rows (-100
    elsewhere), and the sampler's log-probability at each completion token; with ``old`` (each completion's
    log-probabilities in the forward of the step that sampled it), those too, as ``old_logps``."""
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
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "sampled_logps": sampled}
    if old is not None:  # made where they are kept (the GPU, from the sampling step's forward): no round trip
        batch["old_logps"] = old[0].new_zeros((n, width))
        for i, (p, o) in enumerate(zip(prompts, old, strict=True)):
            batch["old_logps"][i, len(p) : len(p) + len(o)] = o
    return batch


class GrpoObjective(Objective):
    """GRPO / Dr. GRPO / DAPO on prompt rows (``grpo`` settings). ``start``: the starting adapter's weights, the KL
    reference of a run from ``model.adapter`` (None: the base, the adapter switched off)."""

    name = "grpo"
    unit = "prompts"
    fault_hint = ", or grpo.beta"
    max_keys = ("logp_delta_max",)

    def __init__(
        self, cfg: Config, peft_model, tokenizer, rewards: RewardSet, stop_ids, start: StartWeights | None, fast=False
    ):
        """``fast``: the run trains on the fast path, so it samples through it too (``kotune.fast.generation``)."""
        self.cfg, self.g, self.model, self.tokenizer = cfg, cfg.grpo, peft_model, tokenizer
        self.generator = None
        if fast:
            from kotune.fast.generation import fast_generator

            self.generator = fast_generator(peft_model)
            if self.generator is None:  # a module it cannot compute exactly (kotune.fast.generation.fast_generator)
                raise RuntimeError("the fast path trains this model but kotune.fast.generation cannot sample it")
        self.rewards, self.start = rewards, start
        self.components = [f"reward[{name}]" for name in rewards.names]
        self.extra_keys = (
            "sampled", "rollout_s", "completions", "reward", "reward_sq", *self.components, "completion_tokens",
            "loss_tokens", "stopped", "logp_delta", "logp_delta_max", "clip_low", "clip_high", "kl",
        )  # fmt: skip
        g = self.g
        self.sampler = Sampler(tokenizer.pad_token_id, tuple(stop_ids), tuple(g.stop), g.max_new_tokens,
                               g.temperature, g.top_p)  # fmt: skip
        self.step, self.sampling, self.rollout_seconds = 0, True, 0.0
        self.samples: dict[int, Sample] = {}
        """This process's samples of the current group, by prompt row (``rl.samples``)."""

    def start_step(self, step: int) -> None:
        self.step = step  # seeds this step's completions (rl.rollout.completion_seed)
        self.sampling = step % self.g.iterations == 0  # else the group's first step sampled this step's prompts
        if self.sampling:
            self.samples = {}

    def prepare(self, passes: list[list[PromptRow]]) -> None:
        """A sampling step samples all of its passes' prompts together: one generation batch of the step's
        prompts x ``generations`` (TRL's generation batch), however many passes train on them."""
        if not self.sampling:
            return
        units = [u for p in passes for u in p]
        started = time.perf_counter()
        samples = self.sample(units, True)  # ends reading the sampled ids back: the device is done with it
        self.rollout_seconds = time.perf_counter() - started
        self.samples.update(zip((u.row for u in units), samples, strict=True))

    def collate(self, units: list[PromptRow], train: bool) -> dict[str, torch.Tensor]:
        if train:  # what ``prepare`` sampled, or on a group's later step what its first step sampled
            batch = self.batch(units, [self.kept(u.row) for u in units], train, old=not self.sampling)
            if self.sampling:  # the step's sampling time, on its first pass
                batch["rollout_s"], self.rollout_seconds = torch.tensor(self.rollout_seconds), 0.0
            return batch
        started = time.perf_counter()
        samples = self.sample(units, train)
        return {
            **self.batch(units, samples, train, old=False),
            "rollout_s": torch.tensor(time.perf_counter() - started),
        }

    def sample(self, units: list[PromptRow], train: bool) -> list[Sample]:
        """Sample and score ``generations`` completions of each prompt (an evaluation: one, greedy)."""
        group = self.g.generations if train else 1
        prompts = [u.ids for u in units for _ in range(group)]
        seeds = [completion_seed(self.cfg.train.seed, self.step, u.row, k) for u in units for k in range(group)]
        sampler = self.sampler if train else replace(self.sampler, temperature=0.0)  # evaluations: greedy
        completions = rollout(self.model, self.tokenizer, prompts, seeds, sampler, self.generator)
        texts = [completion_text(self.tokenizer, c.ids) for c in completions]
        totals, parts = self.rewards.score(texts, [u.fields for u in units for _ in range(group)])
        columns = [parts[name] for name in self.rewards.names]
        spans = [range(j * group, (j + 1) * group) for j in range(len(units))]
        return [
            Sample(len(u.ids), [completions[i] for i in span], [totals[i] for i in span],
                   [[c[i] for c in columns] for i in span], [None] * group)
            for u, span in zip(units, spans, strict=True)
        ]  # fmt: skip

    def kept(self, row: int) -> Sample:
        if row not in self.samples:
            start = self.step - self.step % self.g.iterations
            raise CheckpointError(
                f"step {self.step + 1} trains again on the completions step {start + 1} sampled (grpo.iterations "
                f"{self.g.iterations}), but those of prompt row {row} are not held: was the checkpoint resumed from "
                "written with another grpo.iterations? Resume from one at a multiple of grpo.iterations"
            )
        return self.samples[row]

    def batch(self, units: list[PromptRow], samples: list[Sample], train: bool, old: bool) -> dict:
        """The host batch of ``samples`` (``old``: with the old log-probabilities of a group's later step)."""
        group = len(samples[0].completions)
        prompts = [u.ids for u in units for _ in range(group)]
        completions = [c for s in samples for c in s.completions]
        trained = [c.stopped or not self.g.mask_truncated for c in completions]
        old_logps = [o for s in samples for o in s.old_logps] if old else None
        batch = completion_batch(prompts, completions, self.sampler.pad_id, trained, old_logps)
        rewards = torch.tensor([t for s in samples for t in s.totals], dtype=torch.float32)
        batch["rewards"] = rewards
        batch["components"] = torch.tensor([p for s in samples for p in s.parts], dtype=torch.float32)
        if train:
            batch["advantages"] = group_advantages(rewards, group, self.g.scale_rewards)
            batch["rows"] = [u.row for u in units]  # a list: stays on the host (the sampling step's forward reads it)
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
        sampled = "old_logps" not in batch
        stats = [
            rewards.new_tensor(float(sampled)),
            batch.get("rollout_s", zero),  # on a sampling step's first pass
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
        ref = self.reference_logps(batch, forward) if g.beta else None
        logps = token_logps(forward, batch, g.temperature)
        if sampled:  # the policy that sampled is this one: ratio 1; its log-probs are the group's later steps' old
            old = logps.detach()
            for j, row in enumerate(batch["rows"]):
                self.samples[row].keep_old(old, range(j * g.generations, (j + 1) * g.generations))
        else:
            old = batch["old_logps"][:, 1:]
        high_eps = g.epsilon if g.epsilon_high is None else g.epsilon_high
        loss, low, high = token_losses(logps, old, batch["advantages"], g.epsilon, high_eps, g.beta, ref)
        delta = (logps.detach() - batch["sampled_logps"][:, 1:]).abs() * mask
        kl = (k3(logps.detach(), ref) * mask).sum() if ref is not None else zero
        extras = [delta.sum(), delta.max() if mask.any() else zero, (low & mask).sum(), (high & mask).sum(), kl]
        return pass_loss(loss, mask.float(), g.loss_type), [*stats, *extras]

    def reference_logps(self, batch: dict, forward) -> torch.Tensor:
        """Token log-probs under the reference, without gradients: the starting adapter (``start``) or the base,
        computed by the fast path when the run trains on it (only the labelled positions reach the vocabulary:
        no [rows, length, vocab] logits, 10 GiB for 64 completions of 224 tokens at 8B)."""
        with reference_of(self.model, self.start, fast_module(forward)) as runner:
            return token_logps(runner, batch, self.g.temperature)

    def record(self, sums: dict[str, float], units: float) -> dict[str, Any]:
        tokens = max(1.0, sums["loss_tokens"])
        sampled = sums["sampled"] > 0
        out = {"prompts": int(round(sums["completions"] / self.g.generations)), "sampled": sampled}
        # a group's later steps train on the completions its first step sampled: their rewards, lengths and the
        # sampler's agreement with the training forward were logged then, and are not new measurements
        out.update(self.sample_record(sums) if sampled else {})
        out.update(clip_low=sums["clip_low"] / tokens, clip_high=sums["clip_high"] / tokens)
        if self.g.beta:
            out["kl"] = sums["kl"] / tokens
        return out

    def sample_record(self, sums: dict[str, float]) -> dict[str, Any]:
        """What a sampling step measured of its completions: rewards, lengths, sampler vs training forward."""
        n, tokens = max(1.0, sums["completions"]), max(1.0, sums["loss_tokens"])
        mean = sums["reward"] / n
        return {
            "rollout_s": sums["rollout_s"],
            "reward": mean,
            "reward_std": math.sqrt(max(0.0, sums["reward_sq"] / n - mean**2)),
            **{key: sums[key] / n for key in self.components},
            "completion_length": sums["completion_tokens"] / n,
            "stopped": sums["stopped"] / n,
            "logp_delta_mean": sums["logp_delta"] / tokens,
            "logp_delta_max": sums["logp_delta_max"],
        }

    def checkpoint_tensors(self, step: int) -> dict[str, torch.Tensor]:
        if step % self.g.iterations == 0:  # the next step samples afresh
            return {}
        merged: dict[str, torch.Tensor] = {}
        for part in dist.all_gather_objects(flatten(self.samples)):  # each process holds its prompts' samples
            merged.update(part)
        return merged

    def restore_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        self.samples = unflatten(tensors)  # all processes' (a resume may split the prompts otherwise)

    def eval_record(self, loss: float, sums: dict[str, float], units: float) -> dict[str, Any]:
        n = max(1.0, sums["completions"])
        return {
            "eval_loss": loss,
            "eval_reward": sums["reward"] / n,
            **{f"eval_{key}": sums[key] / n for key in self.components},
            "eval_completion_length": sums["completion_tokens"] / n,
        }
