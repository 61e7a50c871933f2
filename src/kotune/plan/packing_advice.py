"""Whether ``train.packing: full`` would train a run's rows materially faster than the packing it has, and the line
``kotune train`` and ``kotune plan`` print to suggest it, saying what it changes.

``packing: on`` already feeds no padding, but its passes hold one step's rows: on rows much shorter than
``cutoff_len`` they are short passes, bound by launching kernels (``plan.estimate.pass_seconds``). ``full`` packs
the whole training set into sequences of up to ``cutoff_len`` tokens, so its passes are full, and it changes the
recipe (a step holds more rows, an epoch fewer steps), which is why kotune suggests it and never picks it itself.
With a GPU to plan for, the comparison is the plan's time a row; without one, the tokens computed a row (padding
included), the one cost the CPU path has to go on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kotune.config import Config, ConfigError
from kotune.data.order import feeds_packed, sequences, total_steps
from kotune.plan.estimate import Pass, Plan, duration, estimate, run_passes
from kotune.plan.shape import ModelShape

MATERIAL = 1.25
"""How many times cheaper a row must be packed full for kotune to suggest it: a smaller gain is not worth a change
of recipe."""


@dataclass(frozen=True)
class Feed:
    """How one packing feeds the training rows, from the passes the plan makes for the first process."""

    rows: int
    """Rows those passes hold."""
    tokens: int
    """Tokens those passes compute, padding included."""
    padding: int
    """Of ``tokens``, the pad tokens."""
    seconds: float | None
    """The plan's time for those passes; None without a GPU to plan for."""
    steps_per_epoch: float
    rows_per_step: float
    fits: bool = True
    """The plan predicts the run fits the GPU (always True without a plan)."""

    def row_cost(self) -> float:
        """The plan's seconds a row, or without a plan the tokens computed a row."""
        return (self.seconds if self.seconds is not None else self.tokens) / max(1, self.rows)


def feed(cfg: Config, lengths: list[int], world: int, passes: list[Pass], seconds: float | None, fits=True) -> Feed:
    """The ``Feed`` of ``cfg`` from its planned ``passes`` over rows of these token ``lengths``."""
    t = cfg.train
    _, per_epoch = total_steps(cfg, lengths, world)
    rows_per_step = float(t.micro_batch_size * t.gradient_accumulation_steps)
    if t.packing == "full":
        rows_per_step *= len(lengths) / len(sequences(lengths, cfg))
    real = sum(lengths[i] for p in passes for i in p.rows)
    tokens = sum(p.tokens for p in passes)
    rows = sum(len(p.rows) for p in passes)
    return Feed(rows, tokens, tokens - real, seconds, per_epoch / t.gradient_accumulation_steps, rows_per_step, fits)


def full_packing_advice(cfg: Config, now: Feed, full: Feed, train_rows: int) -> str | None:
    """The line suggesting ``train.packing=full`` when it makes a row at least ``MATERIAL`` times cheaper (and
    fits), saying what it changes; None when the run is packed full already, is not SFT, or the gain is small."""
    if cfg.train.packing == "full" or cfg.train.objective != "sft" or not full.fits:
        return None
    gain = now.row_cost() / full.row_cost()
    if gain < MATERIAL:
        return None
    if now.seconds is not None and full.seconds is not None:
        epoch = [duration(f.row_cost() * train_rows) for f in (now, full)]
        why = f"~{gain:.1f}x faster by the plan ({epoch[0]} an epoch now, {epoch[1]} packed full)"
    else:
        why = f"with {gain:.1f}x fewer tokens computed a row"
    if now.padding:
        why += f"; {now.padding / now.tokens:.0%} of the tokens the passes compute now are padding"
    return (
        f"kotune: train.packing=full would train these rows {why}. It changes the recipe: the training rows are "
        f"packed once into sequences of up to {cfg.data.cutoff_len} tokens, several rows to a sequence (each row "
        f"still attends only to itself, from its own position 0), so a step holds ~{full.rows_per_step:.0f} rows "
        f"instead of {now.rows_per_step:.0f} and an epoch has {steps(full)} steps instead of {steps(now)} (warm-up "
        "and schedule count the new steps; the loss averages over more rows a step)"
    )


def steps(feed: Feed) -> str:
    """Steps an epoch as the line says them: ``4,716.8``, ``12.5``, ``125`` (a partial last step counts its part)."""
    return f"{feed.steps_per_epoch:,.1f}".removesuffix(".0")


def packing_advice(
    cfg: Config, lengths: list[int], world: int, plan: Plan | None = None, shape: ModelShape | None = None
) -> str | None:
    """``full_packing_advice`` for this run: with ``plan`` (and the model's ``shape``) by the plan's time on its
    GPU, the passes of the run as configured read from the plan and only the packed-full run planned here; else by
    the tokens computed (``tokens_advice``)."""
    if cfg.train.packing == "full" or cfg.train.objective != "sft":
        return None
    packed_full = replace(cfg, train=replace(cfg.train, packing="full"))
    try:
        if plan is None or shape is None:
            return tokens_advice(cfg, packed_full, lengths, world)
        other = estimate(shape, packed_full, lengths, plan.gpu, plan.fast, world)
        now = feed(cfg, lengths, world, plan.passes, plan.run_seconds)
        full = feed(packed_full, lengths, world, other.passes, other.run_seconds, other.fits)
    except ConfigError:  # packed full, the rows make fewer sequences than a micro-batch, or a step for the processes
        return None
    return full_packing_advice(cfg, now, full, len(lengths))


def tokens_advice(cfg: Config, packed_full: Config, lengths: list[int], world: int) -> str | None:
    """Without a plan, by the tokens computed a row: packed full, a row computes its own tokens and no padding, so
    the only saving is the padding of the passes made now. Passes packed already have none (nothing to simulate);
    padded ones are compared with the same rows unpadded, and the set is packed full (costly on millions of rows)
    only for a line that will be printed."""
    if feeds_packed(cfg.train, False):
        return None
    passes = run_passes(lengths, cfg, world, 0, False)
    now = feed(cfg, lengths, world, passes, None)
    if now.tokens < MATERIAL * (now.tokens - now.padding):  # full_packing_advice's threshold, before the packing
        return None
    unpadded = [replace(p, tokens=sum(lengths[i] for i in p.rows)) for p in passes]
    return full_packing_advice(cfg, now, feed(packed_full, lengths, world, unpadded, None), len(lengths))
