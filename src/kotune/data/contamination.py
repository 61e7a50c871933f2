"""Contamination: training rows that hold an evaluation row's text, found by character n-gram overlap.

The references are the held-out rows (their trained text: the answers, which carry no template text), kotune
eval's bundled multiple-choice set (its questions) and the files in ``data.contamination_sets``. Texts are
normalised as for duplicates (``kotune.data.dedup.normalise``) and their spaces dropped, so spacing differences do
not hide a copy; a reference row is found in a training row when at least ``SHARE`` of its ``NGRAM``-character
n-grams occur there. A share rather than any one shared n-gram keeps templated questions that differ in a word
("'덥다'의 반대말은..." vs "'춥다'의...") apart. The cost is one set lookup per character of training text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from kotune.data.dedup import normalise

NGRAM = 10
"""Characters per n-gram (spaces dropped): short enough for the bundled set's shortest questions, long enough that
Korean text shares one by chance rarely (GPT-3's check used 13 words; characters suit Korean)."""
SHARE = 0.8
"""Share of a reference row's n-grams a training row must hold for the reference to count as found in it."""


@dataclass(frozen=True)
class Overlap:
    """Training row ``row`` of source ``source`` holds the text of row ``ref_row`` of the reference set ``ref``."""

    source: int
    row: int
    ref: str
    ref_row: int


def squeeze(text: str) -> str:
    return normalise(text).replace(" ", "")


def grams(text: str) -> set[str]:
    """The text's ``NGRAM``-character n-grams (none for a shorter text: too generic to check)."""
    return {text[i : i + NGRAM] for i in range(len(text) - NGRAM + 1)}


def reference_text(row: dict) -> str:
    """A reference file row's text: a multiple-choice item's question, else its text columns joined."""
    if isinstance(row.get("question"), str):
        return row["question"]
    return " ".join(str(v) for k, v in row.items() if not k.startswith("_") and isinstance(v, str))


def find_overlaps(
    training: Sequence[Sequence[tuple[int, str]]], references: dict[str, Sequence[tuple[int, str]]]
) -> list[Overlap]:
    """Per training row (``training``: per source, ``(row, text)``), the reference rows whose text it holds."""
    index: dict[str, list[tuple[str, int]]] = {}
    needed: dict[tuple[str, int], int] = {}
    for ref, rows in references.items():
        for ref_row, text in rows:
            mine = grams(squeeze(text))
            if not mine:
                continue
            needed[(ref, ref_row)] = max(1, int(SHARE * len(mine) + 0.999999))
            for gram in mine:
                index.setdefault(gram, []).append((ref, ref_row))
    found = []
    for source, rows in enumerate(training):
        for row, text in rows:
            held = grams(squeeze(text)) & index.keys()
            hits = Counter(key for gram in held for key in index[gram])
            found += [Overlap(source, row, *key) for key, n in sorted(hits.items()) if n >= needed[key]]
    return found


def overlap_message(overlaps: Sequence[Overlap], rows: int) -> str:
    """The audit's line for one source: how many training rows hold evaluation text, from which sets, examples."""
    by_set = Counter(o.ref for o in overlaps)
    train_rows = sorted({o.row for o in overlaps})
    shown = "; ".join(f"row {o.row} ~ {o.ref} row {o.ref_row}" for o in overlaps[:5])
    sets = ", ".join(f"{name} ({n})" for name, n in sorted(by_set.items()))
    return (
        f"{len(train_rows)} training rows ({100 * len(train_rows) / rows if rows else 0:.1f}% of {rows}) hold the "
        f"text of evaluation rows, which then measure memory, not skill: {sets}: {shown}"
        + (" ..." if len(overlaps) > 5 else "")
    )


def references(data, tokenizer, validation, names: Sequence[str]) -> dict[str, list[tuple[int, str]]]:
    """The reference sets: the held-out rows' trained text (per source), the bundled multiple-choice set and
    ``data.contamination_sets``."""
    from kotune.data.examples import IGNORE
    from kotune.data.read import read_rows
    from kotune.paths import CHOICE_SET

    refs: dict[str, list[tuple[int, str]]] = {}
    answers = [[t for t in e.labels if t != IGNORE] for e in validation]
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True) if answers else []
    for e, text in zip(validation, texts, strict=True):
        refs.setdefault(f"{names[e.source]} (held out)", []).append((e.row, text))
    for path in [str(CHOICE_SET), *data.contamination_sets]:
        label = "kotune eval's bundled set" if path == str(CHOICE_SET) else path
        refs[label] = [(row["_row"], reference_text(row)) for row in read_rows(path)]
    return refs
