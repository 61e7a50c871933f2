"""Preference training (``train.objective`` dpo / orpo / simpo / kto): pairs in, the same adapter out.

The loop mirrors ``training.loop.Fit`` at a smaller scale: a step is ``gradient_accumulation_steps`` micro-batches
of ``micro_batch_size`` pairs in a seeded order; the loss is the mean over the step's pairs; the optimizer, the
schedule, clipping, metrics.jsonl and the best-adapter rule are the SFT run's own. Evaluation reports the same
metrics on held-out pairs (``eval_reward_accuracy``: the share of pairs whose chosen response gets the higher
reward). Unpaired KTO data runs the same loop with one response in place of each pair. Checkpoints, resume and
several processes are not supported for preference runs yet.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kotune import output
from kotune.config import Config
from kotune.data.batching import epoch_order
from kotune.data.preference import PreferencePair, UnpairedResponse, collate_pairs
from kotune.run_folder import BEST
from kotune.security import inside
from kotune.training.checkpoint import save_adapter
from kotune.training.loop import RunState, autocast, clip_and_update
from kotune.training.objectives import StartWeights, metric_means, preference_step
from kotune.training.optim import build_optimizer, lr_at
from kotune.training.report import Reporter


def pair_steps(cfg: Config, n_pairs: int) -> int:
    """Optimizer steps of a preference run: ``max_steps``, else ``num_epochs`` over the pairs (at least one)."""
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    return max(1, math.floor(n_pairs // t.micro_batch_size * t.num_epochs / t.gradient_accumulation_steps))


@dataclass
class PairOrder:
    """The pairs of each micro-batch: a seeded shuffle per epoch, as ``data.batching.epoch_order`` gives."""

    n_pairs: int
    size: int
    seed: int

    def micro_batch(self, index: int) -> list[int]:
        per_epoch = self.n_pairs // self.size
        epoch, k = divmod(index, per_epoch)
        order = epoch_order(self.n_pairs, self.seed, epoch)
        return order[k * self.size : (k + 1) * self.size]


class PreferenceFit:
    """The loop of a preference run: steps, evaluations on held-out pairs, the best adapter."""

    def __init__(
        self,
        cfg: Config,
        peft_model,
        pad_id: int,
        train: list[PreferencePair | UnpairedResponse],
        validation: list[PreferencePair | UnpairedResponse],
        output_dir: Path,
        start: StartWeights | None = None,
    ):
        self.cfg, self.model, self.pad_id = cfg, peft_model, pad_id
        self.train_pairs, self.val_pairs, self.output_dir = train, validation, output_dir
        self.device = next(p for p in peft_model.parameters() if p.requires_grad).device
        self.optimizer = build_optimizer(peft_model, cfg.train, self.device)
        self.steps = pair_steps(cfg, len(train))
        self.order = PairOrder(len(train), cfg.train.micro_batch_size, cfg.train.seed)
        self.state = RunState()
        self.start = start
        """The starting adapter's weights, the reference of a run from ``model.adapter`` (None: adapter off)."""
        self.model.train()

    def _batch(self, pairs: list[PreferencePair | UnpairedResponse]) -> dict[str, torch.Tensor]:
        batch = collate_pairs(pairs, self.pad_id, self.cfg.train.pad_to_multiple_of)
        return {k: v.to(self.device) for k, v in batch.items()}

    def step(self) -> dict:
        """Forward / backward over the step's micro-batches (loss: mean over its pairs), clip, update."""
        t = self.cfg.train
        windows = [self.order.micro_batch(self.state.micro_step + i) for i in range(t.gradient_accumulation_steps)]
        n_pairs = sum(map(len, windows))
        sums: dict[str, float] = {}
        for rows in windows:
            batch = self._batch([self.train_pairs[i] for i in rows])
            with autocast(self.cfg, self.device):
                loss, metrics = preference_step(self.model, batch, t.objective, self.cfg.preference, self.start)
            (loss / n_pairs).backward()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        self.state.micro_step += t.gradient_accumulation_steps
        record = metric_means(sums, n_pairs)
        lr = lr_at(self.state.step, self.steps, t)
        grad_norm, finite = clip_and_update(self.model, self.optimizer, t, lr, record["loss"])
        self.state.step += 1
        self.state.skipped_steps += not finite
        self.state.bad_steps = 0 if finite else self.state.bad_steps + 1
        return {
            "step": self.state.step,
            **record,
            "grad_norm": grad_norm,
            "lr": lr,
            "pairs": n_pairs,
            "skipped": not finite,
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The metrics (``eval_`` in front) as means over the held-out pairs."""
        self.model.eval()
        sums, size = {}, self.cfg.train.micro_batch_size
        for i in range(0, len(self.val_pairs), size):
            batch = self._batch(self.val_pairs[i : i + size])
            with autocast(self.cfg, self.device):
                _, metrics = preference_step(
                    self.model, batch, self.cfg.train.objective, self.cfg.preference, self.start
                )
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        self.model.train()
        return {f"eval_{key}": value for key, value in metric_means(sums, len(self.val_pairs)).items()}

    def _evaluate(self, reporter: Reporter) -> None:
        record = {"step": self.state.step, **self.evaluate()}
        reporter.log(record)
        output.status(f"kotune: step {self.state.step}: eval_reward_accuracy {record['eval_reward_accuracy']:.3f}")
        if self.state.best_eval_loss is None or record["eval_loss"] < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_step = record["eval_loss"], self.state.step
            save_adapter(self.model, inside(self.output_dir, BEST))

    def run(self) -> RunState:
        t = self.cfg.train
        reporter = Reporter(self.cfg, self.output_dir, True)
        progress = reporter.progress(self.steps, 0)
        if t.eval_at_start and self.val_pairs:
            self._evaluate(reporter)
        while self.state.step < self.steps:
            start = time.perf_counter()
            record = self.step()
            record["seconds"] = round(time.perf_counter() - start, 3)
            if record["skipped"]:
                output.warn(f"step {record['step']}: non-finite loss or gradient norm; update skipped")
            if self.state.step % t.logging_steps == 0 or self.state.step == self.steps:
                reporter.log(record)
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    acc=f"{record['reward_accuracy']:.2f}",
                    margin=f"{record['reward_margin']:.3f}",
                )
            progress.update(1)
            if self.val_pairs and (self.state.step % t.eval_steps == 0 or self.state.step == self.steps):
                self._evaluate(reporter)
        progress.close()
        return self.state
