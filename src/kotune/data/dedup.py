"""Duplicate rows within and across data sources: exact (the same normalised text) and near (MinHash).

A row's text is what training reads: its encoded tokens decoded, special tokens left out. Normalising (NFKC, case
folded, runs of spaces as one) makes rows that differ only in width forms, case or spacing equal. Near duplicates
are found by MinHash over character 5-grams of the normalised text (character shingles need no word splitter,
which suits Korean, whose particles attach to words) with ``datasketch``'s LSH, each candidate confirmed by its
estimated Jaccard similarity. The first occurrence in source order, then row order, is the one kept; everything
is seeded, so the same rows are found in every process.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

NEAR_THRESHOLD = 0.8
"""Estimated Jaccard similarity of 5-gram sets from which two rows are near duplicates (the usual setting of
MinHash deduplication, e.g. for pretraining corpora)."""
NUM_PERM = 128
"""MinHash permutations: a similarity estimate within about +-0.09 (one standard error ~ 1/sqrt(128))."""
SHINGLE = 5
MINHASH_SEED = 1

SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Duplicate:
    """Row ``row`` of source ``source`` repeats row ``of_row`` of source ``of_source`` (``kind``: exact or near)."""

    source: int
    row: int
    of_source: int
    of_row: int
    kind: str


def normalise(text: str) -> str:
    return SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def find_duplicates(texts: Sequence[Sequence[tuple[int, str]]], mode: str) -> list[Duplicate]:
    """The later copies among ``texts`` (per source, ``(row, text)`` in order); ``mode`` ``exact`` or ``near``
    (``near`` finds exact ones too)."""
    first: dict[bytes, tuple[int, int]] = {}
    found: list[Duplicate] = []
    unique: list[tuple[int, int, str]] = []
    for source, rows in enumerate(texts):
        for row, text in rows:
            norm = normalise(text)
            key = hashlib.sha256(norm.encode()).digest()
            if key in first:
                found.append(Duplicate(source, row, *first[key], "exact"))
            else:
                first[key] = (source, row)
                unique.append((source, row, norm))
    if mode == "near":
        found += _near(unique)
    return sorted(found, key=lambda d: (d.source, d.row))


def _minhash(text: str):
    from datasketch import MinHash

    grams = {text[i : i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))}
    m = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
    m.update_batch([g.encode() for g in sorted(grams)])
    return m


def _near(unique: list[tuple[int, int, str]]) -> list[Duplicate]:
    """Rows (none an exact copy of another) whose MinHash matches an earlier kept row's."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)
    kept: dict[str, tuple[tuple[int, int], object]] = {}
    found = []
    for n, (source, row, text) in enumerate(unique):
        m = _minhash(text)
        matches = [kept[k][0] for k in lsh.query(m) if kept[k][1].jaccard(m) >= NEAR_THRESHOLD]
        if matches:
            found.append(Duplicate(source, row, *min(matches), "near"))
            continue
        key = str(n)
        lsh.insert(key, m)
        kept[key] = ((source, row), m)
    return found


def duplicate_message(dups: Sequence[Duplicate], rows: int, names: Sequence[str], dropped: bool) -> str:
    """The audit's line for one source's duplicates: counts, rate, what is done, and the first examples."""
    exact = sum(d.kind == "exact" for d in dups)
    other = sum(d.of_source != d.source for d in dups)
    share = 100 * len(dups) / rows if rows else 0.0
    shown = "; ".join(
        f"row {d.row} {'=' if d.kind == 'exact' else '≈'} "
        + (f"row {d.of_row}" if d.of_source == d.source else f"{names[d.of_source]} row {d.of_row}")
        for d in dups[:5]
    )
    fate = "left out (data.dedup)" if dropped else "kept (data.dedup=off; exact copies only are looked for)"
    return (
        f"{len(dups)} rows repeat an earlier row ({share:.1f}% of {rows}: {exact} exact, {len(dups) - exact} near, "
        f"{other} of another source), {fate}: {shown}" + (" ..." if len(dups) > 5 else "")
    )
