"""Preference objectives (``train.objective`` dpo / orpo / simpo / kto) for the one loop: pairs in, the same
adapter out.

A step is ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` pairs (unpaired KTO data: single
responses) in the loop's seeded order; the loss is the mean over the step's pairs, all processes. The losses are in
``training.objectives``; each step logs the preference metrics (``objectives.METRICS``) beside the loop's own keys,
and an evaluation reports them on held-out pairs with ``eval_`` in front (``eval_reward_accuracy``: the share of
pairs whose chosen response gets the higher reward).
"""

from __future__ import annotations

from typing import Any

import torch

from kotune.config import Config
from kotune.data.preference import collate_pairs
from kotune.training.objective import Objective
from kotune.training.objectives import METRICS, StartWeights, metric_means, preference_step


class PreferenceObjective(Objective):
    """DPO, ORPO, SimPO or KTO on pairs (or KTO on unpaired responses).

    ``start``: the starting adapter's weights, the reference of a run from ``model.adapter`` (None: the reference
    is the base, the adapter switched off). ``packed``: the fast path computes the log-probs, each micro-batch's
    sequences packed into one row; the reference pass runs through it too.
    """

    fault_hint = ", or preference.beta"

    def __init__(self, cfg: Config, peft_model, pad_id: int, unpaired: bool, packed: bool, start: StartWeights | None):
        self.cfg, self.model, self.pad_id = cfg, peft_model, pad_id
        self.name = cfg.train.objective
        self.unit = "responses" if unpaired else "pairs"
        self.packed, self.start = packed, start
        self.unpaired = unpaired
        self.extra_keys = tuple(
            k for k in sorted({*METRICS, *(("desirable", "undesirable") if unpaired else ())}) if k != "loss"
        )

    def collate(self, units: list, train: bool) -> dict[str, torch.Tensor]:
        return collate_pairs(units, self.pad_id, self.cfg.train.pad_to_multiple_of, packed=self.packed)

    def normaliser(self, units: list, batch: dict[str, torch.Tensor]) -> float:
        return float(len(units))

    def pass_sums(self, forward, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss, metrics = preference_step(self.model, batch, self.name, self.cfg.preference, self.start, forward)
        zero = loss.new_zeros(())
        return loss, [torch.as_tensor(metrics.get(k, zero)) for k in self.extra_keys]

    def record(self, sums: dict[str, float], units: float) -> dict[str, Any]:
        means = metric_means({"loss": 0.0, **sums}, int(units))
        return {**{k: v for k, v in means.items() if k != "loss"}, self.unit: int(units)}

    def eval_record(self, loss: float, sums: dict[str, float], units: float) -> dict[str, Any]:
        means = metric_means({"loss": 0.0, **sums}, int(units))
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in means.items() if k != "loss"}}
