"""Preference training (``train.objective`` dpo / orpo / simpo / kto): pairs in, the same adapter out.

The loop mirrors ``training.loop.Fit`` at a smaller scale: a step is ``gradient_accumulation_steps`` micro-batches
of ``micro_batch_size`` pairs in a seeded order; the loss is the mean over the step's pairs; the optimizer, the
schedule, clipping, metrics.jsonl and the best-adapter rule are the SFT run's own. Evaluation reports the same
metrics on held-out pairs (``eval_reward_accuracy``: the share of pairs whose chosen response gets the higher
reward). Unpaired KTO data runs the same loop with one response in place of each pair. Checkpoints, ``--resume``
and several processes work as for SFT (``training.resume``, ``training.dist``).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from kotune import output
from kotune.config import Config, ConfigError
from kotune.data.batching import epoch_order
from kotune.data.preference import PreferencePair, UnpairedResponse, collate_pairs
from kotune.run_folder import BEST, CHECKPOINT_PREFIX
from kotune.security import inside
from kotune.training import dist
from kotune.training.checkpoint import save_adapter
from kotune.training.loop import NonFiniteLoss, RunState, autocast, clip_and_update, stop_requested
from kotune.training.objectives import METRICS, StartWeights, metric_means, preference_step
from kotune.training.optim import build_optimizer, lr_at
from kotune.training.report import Reporter
from kotune.training.resume import save_checkpoint
from kotune.training.signals import Interrupted, StopOnSignal


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
    """The loop of a preference run: steps, evaluations on held-out pairs, checkpoints, the best adapter.

    With several processes each takes every ``world``-th pair of a step (and of the held-out pairs); the loss is
    normalised by the step's pairs over all processes, so a step trains the same pairs the same way on any number
    of processes. ``resume_from`` / ``save_checkpoint`` (``training.resume``) read and write it as they do ``Fit``.
    """

    def __init__(
        self,
        cfg: Config,
        peft_model,
        pad_id: int,
        train: list[PreferencePair | UnpairedResponse],
        validation: list[PreferencePair | UnpairedResponse],
        output_dir: Path,
        start: StartWeights | None = None,
        fingerprint: dict | None = None,
        fast=None,
    ):
        self.cfg, self.model, self.pad_id = cfg, peft_model, pad_id
        self.train_pairs, self.val_pairs, self.output_dir = train, validation, output_dir
        self.fingerprint = fingerprint
        """What this run trains on (``kotune.training.fingerprint``), written into every checkpoint."""
        self.rank, self.world = dist.rank_and_world()
        t = cfg.train
        if self.world > t.micro_batch_size * t.gradient_accumulation_steps:
            raise ConfigError(
                f"a step of {t.micro_batch_size * t.gradient_accumulation_steps} pairs (train.micro_batch_size x "
                f"train.gradient_accumulation_steps) cannot be split over {self.world} processes; raise "
                "train.gradient_accumulation_steps"
            )
        self.device = next(p for p in peft_model.parameters() if p.requires_grad).device
        self.packed = fast is not None
        """The fast path (``TrainingModel.fast``): each micro-batch's sequences packed into one row, log-probs by the
        chunked kernel, reference and policy both through it."""
        self.ddp_model = dist.wrap(fast if self.packed else peft_model)  # the policy's forward; DDP needs no more
        self.ddp_model.train()
        self.optimizer = build_optimizer(peft_model, t, self.device)
        self.steps = pair_steps(cfg, len(train))
        self.order = PairOrder(len(train), t.micro_batch_size, t.seed)
        self.state = RunState(processes=self.world)
        self.saved_step: int | None = None
        self.start = start
        """The starting adapter's weights, the reference of a run from ``model.adapter`` (None: adapter off)."""
        self.unpaired = bool(train) and isinstance(train[0], UnpairedResponse)
        self.model.train()

    def _batch(self, pairs: list[PreferencePair | UnpairedResponse]) -> dict[str, torch.Tensor]:
        batch = collate_pairs(pairs, self.pad_id, self.cfg.train.pad_to_multiple_of, packed=self.packed)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _sum_metrics(self, batches, loss_scale: float | None) -> dict[str, float]:
        """Run ``batches`` (this process's micro-batches) and return the metric sums of all processes; with
        ``loss_scale``, backpropagate each micro-batch's loss x ``loss_scale`` (all-reduced on the last one)."""
        t, sums = self.cfg.train, {}
        for i, pairs in enumerate(batches):
            batch = self._batch(pairs)
            sync = dist.no_sync(self.ddp_model, last=i == len(batches) - 1) if loss_scale else nullcontext()
            with sync, autocast(self.cfg, self.device):
                loss, metrics = preference_step(
                    self.model, batch, t.objective, self.cfg.preference, self.start, self.ddp_model
                )
                if loss_scale:
                    (loss * loss_scale).backward()
            for key, value in metrics.items():  # summed on the device: one read for the whole step
                sums[key] = sums.get(key, 0.0) + value.detach().double()
        keys = sorted({*METRICS, *(("desirable", "undesirable") if self.unpaired else ())})  # alike on every rank
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        totals = torch.stack([torch.as_tensor(sums.get(k, zero), device=self.device) for k in keys])
        dist.all_reduce_sum(totals)
        return dict(zip(keys, totals.tolist(), strict=True))

    def step(self) -> dict:
        """Forward / backward over the step's pairs (loss: mean over them, all processes), clip, update."""
        t = self.cfg.train
        windows = [self.order.micro_batch(self.state.micro_step + i) for i in range(t.gradient_accumulation_steps)]
        step_rows = [i for rows in windows for i in rows]
        mine = [self.train_pairs[i] for i in step_rows[self.rank :: self.world]]
        batches = [mine[k : k + t.micro_batch_size] for k in range(0, len(mine), t.micro_batch_size)]
        # DDP averages the processes' gradients; the step's gradient is the mean over all its pairs
        sums = self._sum_metrics(batches, loss_scale=self.world / len(step_rows))
        self.state.micro_step += t.gradient_accumulation_steps
        record = metric_means(sums, len(step_rows))
        lr = lr_at(self.state.step, self.steps, t)
        loss = torch.tensor(record["loss"], dtype=torch.float64, device=self.device)
        norm, verdict = clip_and_update(self.model, self.optimizer, t, lr, loss)
        grad_norm, finite = norm.item(), bool(verdict)
        self.state.step += 1
        self.state.skipped_steps += not finite
        self.state.bad_steps = 0 if finite else self.state.bad_steps + 1
        record.update(step=self.state.step, grad_norm=grad_norm, lr=lr, pairs=len(step_rows), skipped=not finite)
        if self.world > 1:
            record["processes"] = self.world
        return {"step": record.pop("step"), **record}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The metrics (``eval_`` in front) as means over the held-out pairs (each process takes a share)."""
        self.model.eval()
        size, mine = self.cfg.train.micro_batch_size, self.val_pairs[self.rank :: self.world]
        sums = self._sum_metrics([mine[i : i + size] for i in range(0, len(mine), size)], loss_scale=None)
        self.model.train()
        return {f"eval_{key}": value for key, value in metric_means(sums, len(self.val_pairs)).items()}

    def _evaluate(self, reporter: Reporter) -> None:
        self.state.eval_pending = False
        record = {"step": self.state.step, **self.evaluate()}
        reporter.log(record)
        output.status(f"kotune: step {self.state.step}: eval_reward_accuracy {record['eval_reward_accuracy']:.3f}")
        if self.state.best_eval_loss is None or record["eval_loss"] < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_step = record["eval_loss"], self.state.step
            if self.rank == 0:
                save_adapter(self.model, inside(self.output_dir, BEST))

    def run(self, stop: StopOnSignal | None = None) -> RunState:
        """Train to the last step; with ``stop``, a signal saves a checkpoint and raises Interrupted."""
        t = self.cfg.train
        reporter = Reporter(self.cfg, self.output_dir, self.rank == 0)
        progress = reporter.progress(self.steps, self.state.step)
        if (t.eval_at_start and self.val_pairs and self.state.step == 0) or self.state.eval_pending:
            self._evaluate(reporter)
        while self.state.step < self.steps:
            start = time.perf_counter()
            record = self.step()
            record["seconds"] = round(time.perf_counter() - start, 3)
            if record["skipped"]:
                output.warn(f"step {record['step']}: non-finite loss or gradient norm; update skipped")
                if self.state.bad_steps >= t.max_bad_steps:
                    progress.close()
                    raise NonFiniteLoss(
                        f"{self.state.bad_steps} consecutive steps with a non-finite loss or gradient norm, the "
                        f"last at step {record['step']} (loss {record['loss']}, grad_norm {record['grad_norm']}). "
                        f"Check the pairs (`kotune data audit`), or lower train.learning_rate (now "
                        f"{t.learning_rate:g}, try {t.learning_rate / 4:g}), or preference.beta"
                    )
            if self.state.step % t.logging_steps == 0 or self.state.step == self.steps:
                reporter.log(record)
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    acc=f"{record['reward_accuracy']:.2f}",
                    margin=f"{record['reward_margin']:.3f}",
                )
            progress.update(1)
            if stop is not None and self.state.step < self.steps and stop_requested(stop, self.device):
                progress.close()
                self._interrupt(stop)
            if self.val_pairs and (self.state.step % t.eval_steps == 0 or self.state.step == self.steps):
                self._evaluate(reporter)
            if self.state.step % t.save_steps == 0 or self.state.step == self.steps:
                save_checkpoint(self)  # the last step too: a finished run can be extended with --resume
        progress.close()
        if self.state.step and self.state.skipped_steps == self.state.step:
            raise NonFiniteLoss(
                f"no update was applied: all {self.state.step} steps had a non-finite loss or gradient norm, so "
                f"the adapter is untrained. Lower train.learning_rate (now {t.learning_rate:g})"
            )
        return self.state

    def _interrupt(self, stop: StopOnSignal):
        """Save a checkpoint at this step (unless one was just written) and raise Interrupted."""
        folder = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step}"
        self.state.eval_pending = bool(self.val_pairs) and self.state.step % self.cfg.train.eval_steps == 0
        if self.saved_step != self.state.step:
            folder = save_checkpoint(self)
        raise Interrupted(stop.signum, self.state.step, folder if self.rank == 0 else None)
