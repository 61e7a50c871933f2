"""Data order: which training rows each optimizer step sees, and on which process.

The order is a list of units per epoch: single rows, or with ``train.packing: full`` the sequences of up to
``cutoff_len`` tokens the whole training set was packed into once. A micro-batch is ``micro_batch_size`` units and
a step ``gradient_accumulation_steps`` micro-batches, whatever the number of processes; the processes split the
step's units between them (``share``). Everything here is a pure function of the config, the rows' lengths and the
position in the order (``micro_step``), so a resumed run sees exactly the rows it would have, and ``kotune plan``
(``plan.estimate``) plans the very passes training feeds (``step_passes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

import numpy as np

from kotune.config import Config, ConfigError, TrainConfig
from kotune.data.batching import epoch_order, epoch_order_array, length_grouped_order
from kotune.data.packing import pack_best_fit, pack_groups, pack_windows


def unit_config(cfg: Config) -> Config:
    """The config the order reads for this run's units: ``train.packing`` packs SFT rows; a preference run's
    units (pairs, unpaired responses) are ordered one by one (on the fast path a pass's sequences are laid end to
    end by their collation, ``data.preference.collate_pairs``)."""
    if cfg.train.objective == "sft" or cfg.train.packing == "off":
        return cfg
    return replace(cfg, train=replace(cfg.train, packing="off"))


def feeds_packed(t: TrainConfig, fast: bool) -> bool:
    """Whether passes are fed as packed sequences (``collate_packed``) rather than padded micro-batches."""
    return t.packing in ("on", "full") or (t.packing == "auto" and fast)


PACK_WINDOW = 100_000
"""Rows packed together with ``data.streaming`` (``pack_windows``): one packing of a window takes about a second."""


@lru_cache(maxsize=4)
def _packed_set(lengths: tuple[int, ...], budget: int, seed: int, window: int | None) -> list[list[int]]:
    if window is not None:
        return pack_windows(list(lengths), budget, seed, window)
    return pack_best_fit(list(lengths), budget, seed)


def sequences(lengths: list[int], cfg: Config) -> list[list[int]]:
    """``packing: full``: the training rows packed once, best fit decreasing, into sequences of <= cutoff_len
    (with ``data.streaming``, within windows of ``PACK_WINDOW`` rows)."""
    window = PACK_WINDOW if cfg.data.streaming else None
    return _packed_set(tuple(lengths), cfg.data.cutoff_len, cfg.train.seed, window)


def unit_count(lengths: list[int], cfg: Config) -> int:
    """Units of an epoch's order: packed sequences with ``packing: full``, else rows."""
    return len(sequences(lengths, cfg)) if cfg.train.packing == "full" else len(lengths)


def epoch_units(lengths: list[int], cfg: Config, epoch: int) -> Sequence[list[int]]:
    """An epoch's order as units (lists of row indices), the same for any number of processes.

    Rows: shuffled with (seed, epoch), or length-grouped. Packed sequences (``packing: full``): shuffled the same
    way; ``group_by_length`` does not apply to them (a sequence is already near ``cutoff_len``).
    """
    t = cfg.train
    if t.packing == "full":
        packed = sequences(lengths, cfg)
        return [packed[i] for i in epoch_order(len(packed), t.seed, epoch)]
    if t.group_by_length:
        return [[i] for i in length_grouped_order(lengths, t.seed, epoch, 64 * t.micro_batch_size)]
    return RowUnits(epoch_order_array(len(lengths), t.seed, epoch))


class RowUnits(Sequence):
    """An epoch's order of single rows as units ``[i]``, held as one array: a step's lists are made when it is read
    (a list of one-row lists costs about 100 bytes a row; millions of streamed rows)."""

    def __init__(self, order: np.ndarray):
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [[i] for i in self.order[index].tolist()]
        return [int(self.order[index])]


def share(rows: list, lengths: list[int], rank: int, world: int) -> list:
    """This process's part of a step's rows (or units): longest first to the least loaded process, kept in step
    order.

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


class Epochs:
    """The epochs' orders of one run over rows of these ``lengths``, memoised (one epoch at a time): nothing but
    ``epoch_units``, so whatever reads them stays a pure function of (config, lengths, position)."""

    def __init__(self, lengths: list[int], cfg: Config):
        self.lengths, self.cfg = lengths, cfg
        self.per_epoch = unit_count(lengths, cfg) // cfg.train.micro_batch_size
        """Micro-batches an epoch (a partial last one is left out)."""
        self._epoch: int | None = None
        self._units: Sequence[list[int]] = []

    def units(self, epoch: int) -> Sequence[list[int]]:
        if self._epoch != epoch:
            self._epoch, self._units = epoch, epoch_units(self.lengths, self.cfg, epoch)
        return self._units


def step_units(epochs: Epochs, micro_step: int) -> list[list[int]]:
    """The units of the optimizer step that starts at ``micro_step`` (all processes)."""
    t = epochs.cfg.train
    size = t.micro_batch_size
    out: list[list[int]] = []
    for m in range(micro_step, micro_step + t.gradient_accumulation_steps):
        epoch, index = divmod(m, epochs.per_epoch)
        out += epochs.units(epoch)[index * size : (index + 1) * size]
    return out


def step_passes(epochs: Epochs, micro_step: int, rank: int, world: int, packed: bool) -> list[list[int]]:
    """The passes process ``rank`` makes in the step that starts at ``micro_step``: row indices per pass.

    Padded: ``micro_batch_size`` of this process's rows a pass. ``packing: on``: this process's rows packed into
    as few sequences of at most micro_batch_size x cutoff_len tokens as fit. ``packing: full``: this process's
    packed sequences, ``micro_batch_size`` of them a pass (fed end to end: the same per-row attention).
    """
    cfg, lengths = epochs.cfg, epochs.lengths
    size = cfg.train.micro_batch_size
    step = step_units(epochs, micro_step)
    mine = share(step, [sum(lengths[i] for i in u) for u in step], rank, world)
    if packed and cfg.train.packing != "full":
        ids = [i for u in mine for i in u]
        groups = pack_groups([lengths[i] for i in ids], size * cfg.data.cutoff_len)
        return [[ids[j] for j in g] for g in groups]
    return [[i for u in mine[k : k + size] for i in u] for k in range(0, len(mine), size)]


def repeats(cfg: Config) -> int:
    """Optimizer steps that train on one step's units: ``grpo.iterations`` (a batch of sampled completions is
    trained on that many times, TRL's ``num_iterations``), else 1."""
    return cfg.grpo.iterations if cfg.train.objective == "grpo" else 1


def step_start(cfg: Config, step: int) -> int:
    """Where optimizer step ``step`` (0-based) starts in the data order: every step of a group of ``repeats``
    steps starts where the group does, so its steps see the same units and the next group the units after them."""
    return step // repeats(cfg) * cfg.train.gradient_accumulation_steps


def total_steps(cfg: Config, lengths: list[int], world: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per epoch) over rows of these token ``lengths``; a step's units (rows, or
    packed sequences with ``packing: full``) are split over ``world`` processes. An epoch takes ``repeats`` times
    the steps its micro-batches make."""
    t = cfg.train
    unit = {"sft": "row(s)", "grpo": "prompt(s)"}.get(t.objective, "pair(s)")
    unit = "packed sequence(s)" if t.packing == "full" else unit
    n = unit_count(lengths, cfg)
    per_epoch = n // t.micro_batch_size
    if per_epoch == 0:
        raise ConfigError(f"{n} training {unit} are fewer than one micro-batch ({t.micro_batch_size})")
    if t.micro_batch_size * t.gradient_accumulation_steps < world:
        raise ConfigError(
            f"a step of {t.micro_batch_size * t.gradient_accumulation_steps} {unit} cannot be split over {world} "
            "processes: raise train.gradient_accumulation_steps to at least the number of processes"
        )
    if t.max_steps is not None:
        return t.max_steps, per_epoch
    steps = math.floor(per_epoch * t.num_epochs / t.gradient_accumulation_steps) * repeats(cfg)
    return max(1, steps), per_epoch


def describe(cfg: Config, lengths: list[int], world: int) -> str:
    """The run's step composition for the log: rows a step and steps an epoch (``packing: full`` changes both)."""
    t = cfg.train
    steps, per_epoch = total_steps(cfg, lengths, world)
    per_step = t.micro_batch_size * t.gradient_accumulation_steps
    epoch_steps = per_epoch / t.gradient_accumulation_steps * repeats(cfg)
    if t.packing != "full":
        return f"kotune: steps: {per_step} rows a step, {epoch_steps:g} steps an epoch, {steps} steps"
    packed = sequences(lengths, cfg)
    mean = len(lengths) / len(packed) * per_step
    return (
        f"kotune: steps (packing full): {len(lengths)} rows packed into {len(packed)} sequences of up to "
        f"{cfg.data.cutoff_len} tokens; {per_step} sequences (~{mean:.1f} rows) a step, {epoch_steps:g} steps an "
        f"epoch, {steps} steps (packing off or on: {per_step} rows a step)"
    )


class DataOrder:
    """The units of a run (rows, or preference pairs) in step order, for one process of ``world``: which units
    each of its passes holds. What a pass feeds the model is the objective's (``training.objective``)."""

    def __init__(self, lengths: list[int], cfg: Config, rank: int, world: int, packed: bool):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.packed = packed
        """Passes are packed sequences (``feeds_packed``) rather than padded micro-batches."""
        self.epochs = Epochs(lengths, cfg)
        self.per_epoch = self.epochs.per_epoch

    def step_rows(self, micro_step: int) -> list[int]:
        """Indices of the units of the optimizer step that starts at ``micro_step`` (all processes)."""
        return [i for u in step_units(self.epochs, micro_step) for i in u]

    def passes(self, micro_step: int) -> list[list[int]]:
        """This process's passes of the step that starts at ``micro_step`` (unit indices per pass)."""
        return step_passes(self.epochs, micro_step, self.rank, self.world, self.packed)

    def most_passes(self, micro_step: int) -> int:
        """The most passes any process has in the step that starts at ``micro_step`` (FSDP: every process must
        run as many, each pass gathering every layer's weights together)."""
        return max(len(step_passes(self.epochs, micro_step, r, self.world, self.packed)) for r in range(self.world))
