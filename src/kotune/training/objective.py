"""What a training objective supplies to the one loop (``training.loop.Fit``), and supervised fine-tuning's.

The loop owns everything objectives share: the order of the units a step consumes (``data.order``), the step
(forward / backward over the accumulation window, clip, update, no host waits), evaluation, the non-finite stop
that names the rows, checkpoints, resume, signals, DDP and FSDP. An objective owns what differs:

- the unit a step consumes (a row; a preference pair; an unpaired response; each knows its ``input_tokens``, which
  balance a step's units over the processes),
- how units become a batch, for training and for evaluation,
- the number a step's summed loss is divided by (supervised tokens for SFT, pairs for DPO),
- a pass's summed loss and its extra metric sums, and the keys those become in ``metrics.jsonl``.

An objective whose step first generates (online RL) plugs in the same way: its ``collate`` is where the
completions of a step's prompts are sampled and scored, and its ``pass_sums`` the policy loss on them.
"""

from __future__ import annotations

from typing import Any

import torch

from kotune.data.batching import collate, to_device
from kotune.data.examples import IGNORE, Example


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens whose next-token prediction is trained (labels shifted by one, as the loss reads them)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a batch feeds the model, padding not counted."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


class Objective:
    """The base of every objective; subclasses set the attributes and implement ``collate``, ``normaliser`` and
    ``pass_sums``."""

    name = "sft"
    unit = "rows"
    """What a step consumes, in messages ("rows", "pairs", "responses")."""
    extra_keys: tuple[str, ...] = ()
    """The metric sums ``pass_sums`` returns besides the loss, in order (summed over the step, all processes)."""
    max_keys: tuple[str, ...] = ()
    """Those of ``extra_keys`` that are maxima (of non-negative values) over the step's passes and processes."""
    fault_hint = ""
    """Appended to the message of a run stopped by non-finite steps: what else to try for this objective."""
    packed = False
    """Training passes are fed as packed sequences (the fast path's form) rather than padded micro-batches."""

    def start_step(self, step: int) -> None:
        """Called before a training step's batches are made, with the number of steps done (restored on resume)."""

    def prepare(self, passes: list[list]) -> None:
        """Called with a training step's units, pass by pass, before any of its passes is collated."""

    def checkpoint_tensors(self, step: int) -> dict[str, torch.Tensor]:
        """What a checkpoint at ``step`` (steps done) needs of the objective for the next steps to train as an
        uninterrupted run would, besides weights, optimizer, RNG and counters; every process calls it (it may
        gather from all of them) and the first process's answer is written."""
        return {}

    def restore_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Take back what ``checkpoint_tensors`` gave for a checkpoint at ``step``."""

    def collate(self, units: list, train: bool) -> dict[str, torch.Tensor]:
        """A host batch of ``units``; ``train``: a training pass (else an evaluation pass)."""
        raise NotImplementedError

    def normaliser(self, units: list, batch: dict[str, torch.Tensor]) -> float:
        """This pass's share of what the step's summed loss is divided by."""
        raise NotImplementedError

    def on_device(self, batch: dict, device: torch.device, train: bool) -> dict:
        """``batch`` moved to the device the model computes on (``train``: a training pass)."""
        return {k: to_device(v, device) for k, v in batch.items()}

    def pass_sums(self, forward, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(summed loss of the pass, its ``extra_keys`` sums), on the device; ``forward`` is the module to call
        (the fast model or the peft model, wrapped by DDP when distributed)."""
        raise NotImplementedError

    def record(self, sums: dict[str, float], units: float) -> dict[str, Any]:
        """The objective's own keys of a step's record, from the step's ``extra_keys`` sums over ``units``."""
        return {}

    def eval_record(self, loss: float, sums: dict[str, float], units: float) -> dict[str, Any]:
        """An evaluation's record: ``loss`` is the held-out loss (summed loss / normaliser)."""
        return {"eval_loss": loss}

    def eval_extras(self, model, validation: list) -> dict[str, Any]:
        """Anything an evaluation adds on the first process (SFT: greedy replies, ``train.eval_generate``)."""
        return {}


class SupervisedObjective(Objective):
    """Next-token loss on the supervised tokens (the response), normalised by those tokens over the whole step."""

    def __init__(self, model, tokenizer, cfg, packed: bool):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.packed = packed
        self.pad_id = tokenizer.pad_token_id

    def collate(self, units: list[Example], train: bool) -> dict[str, torch.Tensor]:
        from kotune.data.batching import collate_packed

        if train and self.packed:
            return collate_packed(units)
        return collate(units, self.pad_id, self.cfg.train.pad_to_multiple_of)

    def normaliser(self, units: list[Example], batch: dict[str, torch.Tensor]) -> float:
        return float(supervised_tokens(batch))

    def on_device(self, batch: dict, device: torch.device, train: bool) -> dict:
        if train:  # the fast path reads ids and bounds on the host: taken out before the batch moves
            batch = self.model.host_side(batch)
        return super().on_device(batch, device, train)

    def pass_sums(self, forward, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model.loss_sum(forward, batch), []

    def eval_extras(self, model, validation: list[Example]) -> dict[str, Any]:
        if not self.cfg.train.eval_generate:
            return {}
        from kotune.evaluation.checks import training_checks  # did it learn to stop, does it loop

        return training_checks(model, self.tokenizer, validation, self.cfg.train.eval_generate)
