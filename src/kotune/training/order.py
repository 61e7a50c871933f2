"""Data order: which training rows each optimizer step sees, and on which process.

A step is ``gradient_accumulation_steps`` micro-batches of the epoch's order, whatever the number of processes;
the processes split the step's rows between them (``share``). Everything here is a pure function of the config,
the rows and the position in the order (``micro_step``), so a resumed run sees exactly the rows it would have.
"""

from __future__ import annotations

import math

import torch

from kotune.config import Config, ConfigError
from kotune.data.batching import collate, collate_packed, epoch_order, length_grouped_order
from kotune.data.examples import Example
from kotune.data.packing import pack_groups


def micro_batches(examples: list[Example], cfg: Config, epoch: int) -> list[list[int]]:
    """An epoch's micro-batches (lists of example indices), the same for any number of processes."""
    t = cfg.train
    if t.group_by_length:
        order = length_grouped_order([len(e.input_ids) for e in examples], t.seed, epoch, 64 * t.micro_batch_size)
    else:
        order = epoch_order(len(examples), t.seed, epoch)
    size = t.micro_batch_size
    return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]


def share(rows: list[int], lengths: list[int], rank: int, world: int) -> list[int]:
    """This process's part of a step's rows: longest first to the least loaded process, kept in step order.

    Every process computes the same split from the same step, so no message is exchanged; each gets at least
    one row when the step has at least ``world`` rows. With one process, all rows in their order.
    """
    if world == 1:
        return rows
    load, mine = [0] * world, []
    for position in sorted(range(len(rows)), key=lambda j: -lengths[j]):
        target = min(range(world), key=lambda k: load[k])
        load[target] += lengths[position]
        if target == rank:
            mine.append(position)
    return [rows[p] for p in sorted(mine)]


def total_steps(cfg: Config, n_examples: int, world: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per epoch); the step's rows are split over ``world`` processes."""
    t = cfg.train
    per_epoch = n_examples // t.micro_batch_size
    if per_epoch == 0:
        raise ConfigError(f"{n_examples} training rows are fewer than one micro-batch ({t.micro_batch_size} rows)")
    if t.micro_batch_size * t.gradient_accumulation_steps < world:
        raise ConfigError(
            f"a step of {t.micro_batch_size * t.gradient_accumulation_steps} row(s) cannot be split over {world} "
            "processes: raise train.gradient_accumulation_steps to at least the number of processes"
        )
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps, per_epoch
    steps = math.floor(per_epoch * cfg.train.num_epochs / cfg.train.gradient_accumulation_steps)
    return max(1, steps), per_epoch


class DataOrder:
    """The training rows in step order, for one process of ``world``."""

    def __init__(self, rows: list[Example], cfg: Config, rank: int, world: int, pad_id: int, packed: bool):
        self.rows, self.cfg, self.rank, self.world = rows, cfg, rank, world
        self.pad_id = pad_id
        self.packed = packed
        """Feed a step's rows as few packed sequences (``train.packing``) rather than padded micro-batches."""
        self.per_epoch = len(rows) // cfg.train.micro_batch_size
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    def batch_ids(self, micro_step: int) -> list[int]:
        """Indices into the training rows of micro-batch ``micro_step`` (all processes)."""
        epoch, index = divmod(micro_step, self.per_epoch)
        if self._epoch != epoch:
            self._epoch, self._batches = epoch, micro_batches(self.rows, self.cfg, epoch)
        return self._batches[index]

    def step_rows(self, micro_step: int) -> list[int]:
        """Indices of the rows of the optimizer step that starts at ``micro_step`` (all processes)."""
        steps = range(micro_step, micro_step + self.cfg.train.gradient_accumulation_steps)
        return [i for m in steps for i in self.batch_ids(m)]

    def window(self, micro_step: int) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the optimizer step that starts at ``micro_step``.

        Packed, the same rows come as few sequences of at most micro_batch_size x cutoff_len tokens (the most an
        unpacked micro-batch can hold), so the step and its loss are unchanged.
        """
        t = self.cfg.train
        ids = self.step_rows(micro_step)
        ids = share(ids, [len(self.rows[i].input_ids) for i in ids], self.rank, self.world)
        rows = [self.rows[i] for i in ids]
        if not self.packed:
            size = t.micro_batch_size
            return [collate(rows[i : i + size], self.pad_id, t.pad_to_multiple_of) for i in range(0, len(rows), size)]
        packs = pack_groups([len(e.input_ids) for e in rows], t.micro_batch_size * self.cfg.data.cutoff_len)
        return [collate_packed([rows[i] for i in pack]) for pack in packs]
