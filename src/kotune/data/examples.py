"""What encoding produces and the cache stores: examples (ids and labels), tables of them, per-row outcomes.

Storage types only, so that batching, caching, auditing and training read them without the tokenizer code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IGNORE = -100


@dataclass
class Example:
    row: int
    input_ids: list[int]
    labels: list[int]
    source: int = 0
    """Which of the data's sources the row comes from (``Prepared.source_names``); 0 with one source."""

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    @property
    def input_tokens(self) -> int:
        """Tokens the row feeds the model (a preference pair's counterpart: ``PreferencePair.input_tokens``)."""
        return len(self.input_ids)


@dataclass
class EncodeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    """Rows cut at the cutoff (kept if any trained token is left)."""
    eos_lost: int = 0
    """Kept rows whose closing EOS (or end-of-turn token) was cut off by the cutoff."""
    skipped: Counter = field(default_factory=Counter)
    """Rows left out, by reason."""
    skipped_rows: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, row: int) -> None:
        self.skipped[reason] += 1
        self.skipped_rows.setdefault(reason, []).append(row)

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated at the cutoff ({self.eos_lost} lost their EOS)")
        for reason, count in sorted(self.skipped.items()):
            parts.append(f"{count} skipped: {reason}")
        return "; ".join(parts)


class ExampleTable(Sequence):
    """Examples stored flat: ``ids`` and ``labels`` of all rows in two arrays, example ``i`` at
    ``starts[i]:ends[i]``. Indexing builds an ``Example``; ``take`` selects rows without copying tokens."""

    def __init__(
        self,
        ids: np.ndarray,
        labels: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        rows: np.ndarray,
        sources: np.ndarray | None = None,
    ):
        self.ids, self.labels = ids, labels
        self.starts, self.ends, self.rows = starts, ends, rows
        self.sources = np.zeros(len(rows), dtype=np.int64) if sources is None else sources

    @classmethod
    def from_arrays(cls, rows: np.ndarray, lengths: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> ExampleTable:
        """Examples laid end to end in ``ids`` / ``labels``, ``lengths[i]`` tokens each."""
        ends = np.cumsum(lengths)
        return cls(ids, labels, ends - lengths, ends, rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        a, b = int(self.starts[index]), int(self.ends[index])
        row, source = int(self.rows[index]), int(self.sources[index])
        return Example(row, self.ids[a:b].tolist(), self.labels[a:b].tolist(), source)

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def take(self, indices: np.ndarray) -> ExampleTable:
        """The examples at ``indices``, in that order, sharing this table's token arrays."""
        starts, ends, rows = self.starts[indices], self.ends[indices], self.rows[indices]
        return ExampleTable(self.ids, self.labels, starts, ends, rows, self.sources[indices])

    @classmethod
    def joined(cls, tables: Sequence[ExampleTable]) -> ExampleTable:
        """The examples of ``tables`` end to end, table ``i``'s marked as source ``i`` (one table: itself, its
        token arrays shared, not copied)."""
        if len(tables) == 1:
            return tables[0]
        offsets = np.cumsum([0] + [len(t.ids) for t in tables[:-1]])
        return cls(
            np.concatenate([t.ids for t in tables]),
            np.concatenate([t.labels for t in tables]),
            np.concatenate([t.starts + o for t, o in zip(tables, offsets, strict=True)]),
            np.concatenate([t.ends + o for t, o in zip(tables, offsets, strict=True)]),
            np.concatenate([t.rows for t in tables]),
            np.concatenate([np.full(len(t), i, dtype=np.int64) for i, t in enumerate(tables)]),
        )


def unit_lengths(units: Sequence) -> list[int]:
    """Tokens each unit feeds the model; an ``ExampleTable``'s from its index, without reading its tokens (a
    streamed, memory-mapped source is not read whole for them)."""
    if isinstance(units, ExampleTable):
        return units.lengths().tolist()
    return [u.input_tokens for u in units]


@dataclass
class Encoded:
    """Every row of one source encoded: the kept examples, and per row (by ``_row``) what happened to it."""

    examples: ExampleTable
    length: np.ndarray
    """Tokens per row before the cutoff (0 for rows skipped before encoding)."""
    truncated: np.ndarray
    """Per row: cut at the cutoff."""
    eos_lost: np.ndarray
    """Per row: kept, but the closing EOS / end-of-turn token was cut off."""
    skip: np.ndarray
    """Per row: -1 when kept, else the index of its reason in ``reasons``."""
    reasons: list[str]
    segment_tokens: np.ndarray | None = None
    """Tokens of each rendered segment, rows in order (fresh encodings only; the cache keeps the audit instead)."""

    def example_index(self) -> np.ndarray:
        """Per row: the index of its example in ``examples``, -1 when skipped."""
        index = np.full(len(self.skip), -1, dtype=np.int64)
        index[self.examples.rows] = np.arange(len(self.examples))
        return index

    def select(self, rows: Sequence[int]) -> ExampleTable:
        """The kept examples of ``rows``, in that order."""
        index = self.example_index()[np.asarray(rows, dtype=np.int64)]
        return self.examples.take(index[index >= 0])

    def stats(self, rows: Sequence[int]) -> EncodeStats:
        """What happened to ``rows`` (in that order), as counts and row ids."""
        rows = np.asarray(rows, dtype=np.int64)
        stats = EncodeStats(rows=len(rows))
        stats.kept = int((self.skip[rows] == -1).sum())
        stats.truncated = int(self.truncated[rows].sum())
        stats.eos_lost = int(self.eos_lost[rows].sum())
        for row in rows[self.skip[rows] >= 0].tolist():
            stats.skip(self.reasons[self.skip[row]], row)
        return stats
