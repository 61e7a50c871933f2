"""A mixture of data sources: which rows of which source train, how often, and in what order.

Everything here is a pure function of the config (the seed, the sources' settings) and of the encoded rows, so
every process of a run and every resume builds the same list; ``kotune.data.order`` then orders it into steps as
it does one source's rows.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np

from kotune.config import DataConfig
from kotune.data.examples import EncodeStats, ExampleTable
from kotune.source_config import SourceConfig


def source_list(data: DataConfig) -> list[SourceConfig]:
    """The sources to train on: ``data.sources``, or ``data.path`` as the one source."""
    return list(data.sources) or [SourceConfig(path=data.path, split=data.split)]


def source_names(data: DataConfig) -> list[str]:
    """What an example's ``source`` index names: the training sources' labels, then ``data.validation_path``."""
    return [s.label() for s in source_list(data)] + ([data.validation_path] if data.validation_path else [])


def source_data(data: DataConfig, source: SourceConfig) -> DataConfig:
    """``data`` as this source reads it: its path, split, and its own format, template and columns where set."""
    return dataclasses.replace(
        data,
        path=source.path,
        split=source.split,
        format=source.format or data.format,
        template=source.template or data.template,
        columns=data.columns if source.columns is None else source.columns,
        max_rows=data.max_rows if source.max_rows is None else source.max_rows,
        sources=[],
    )


def held_out_share(data: DataConfig, source: SourceConfig) -> float:
    """The share of the source's rows held out for validation (none when ``validation_path`` is the held-out set)."""
    if source.val_size is not None:
        return source.val_size
    return 0.0 if data.validation_path else data.val_size


def counts(available: Sequence[int], sources: Sequence[SourceConfig]) -> list[int]:
    """Examples each source puts in the mixture: ``epochs`` times its examples, or for weighted sources their
    share of the examples they hold together (neither set: one epoch)."""
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    total_weight = sum(sources[i].weight for i in weighted)
    pool = sum(available[i] for i in weighted)
    out = []
    for n, s in zip(available, sources, strict=True):
        if s.weight is not None:
            out.append(round(pool * s.weight / total_weight))
        else:
            out.append(round(n * (1.0 if s.epochs is None else s.epochs)))
    return out


def mix(kept: Sequence[np.ndarray], sources: Sequence[SourceConfig], seed: int) -> np.ndarray:
    """The training list, ``[n, 2]`` picks: each source's examples (``kept``, already in its seeded order) taken in
    turn until its count (``counts``) is reached, repeating from its start when the count is more than it holds;
    several sources are then interleaved by a seeded shuffle (one source keeps its order: it is shuffled already).
    Arrays, not a list of pairs: a streamed source of millions of rows costs 16 bytes a pick."""
    parts = [np.zeros((0, 2), dtype=np.int64)]
    for source, (examples, n) in enumerate(zip(kept, counts([len(k) for k in kept], sources), strict=True)):
        if len(examples):
            taken = np.asarray(examples, dtype=np.int64)[np.arange(n) % len(examples)]
            parts.append(np.stack([np.full(n, source, dtype=np.int64), taken], axis=1))
    picks = np.concatenate(parts)
    if len(kept) > 1:
        order = list(range(len(picks)))  # Random.shuffle moves positions alike whatever they hold
        random.Random(f"mixture:{seed}").shuffle(order)
        picks = picks[np.asarray(order, dtype=np.int64)]
    return picks


def gather(tables: Sequence[ExampleTable], picks) -> ExampleTable:
    """The picked examples (``[n, 2]``: source, example) as one table, each marked with its source; token arrays
    are joined only when the picks come from several sources."""
    picks = np.asarray(picks, dtype=np.int64).reshape(-1, 2)
    used = np.unique(picks[:, 0]).tolist() or [0]
    joined = ExampleTable.joined([tables[s] for s in used])
    offsets = np.zeros(max(used) + 1, dtype=np.int64)
    offsets[used] = np.cumsum([0] + [len(tables[s]) for s in used[:-1]])
    table = joined.take(offsets[picks[:, 0]] + picks[:, 1])
    table.sources = np.asarray(used, dtype=np.int64)[table.sources] if len(used) > 1 else np.full(len(picks), used[0])
    return table


def merged_stats(stats: Sequence[EncodeStats], names: Sequence[str]) -> EncodeStats:
    """Several sources' counts as one (a skip reason names its source when several have rows)."""
    present = [(s, name) for s, name in zip(stats, names, strict=False) if s.rows]
    if len(present) <= 1:
        return present[0][0] if present else stats[0]
    out = EncodeStats()
    for s, name in present:
        out.rows, out.kept = out.rows + s.rows, out.kept + s.kept
        out.truncated, out.eos_lost = out.truncated + s.truncated, out.eos_lost + s.eos_lost
        for reason, rows in s.skipped_rows.items():
            for row in rows:
                out.skip(f"{reason} ({name})", row)
    return out
