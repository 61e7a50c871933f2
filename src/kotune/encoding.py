"""Tokenization and labels, exact by construction.

Each segment of a rendered row is encoded on its own (no special tokens), the ids are concatenated, BOS is
put in front once when the tokenizer's own encoding starts with it, and EOS closes the response. Labels copy
the ids of trained segments and hold -100 elsewhere, so the mask cannot shift whatever the tokenizer merges.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kotune.formats import Rendered

IGNORE = -100


@dataclass
class Example:
    row: int
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class EncodeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    """Rows cut at the cutoff (kept if any trained token is left)."""
    eos_lost: int = 0
    """Kept rows whose closing EOS was cut off by the cutoff."""
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


def bos_id_to_add(tokenizer) -> int | None:
    """BOS to put in front, only if the tokenizer itself starts encodings with it (mirrors pretraining)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def encode_segments(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, encoded alone, without special tokens, in one batched call."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def build_example(
    rendered: Rendered,
    segment_ids: list[list[int]],
    bos: int | None,
    eos: int,
    cutoff_len: int,
    stats: EncodeStats,
) -> Example | None:
    """Concatenate a row's encoded segments, mask untrained ones, apply the cutoff; None if nothing is trained."""
    ids: list[int] = [bos] if bos is not None else []
    labels: list[int] = [IGNORE] * len(ids)
    for (_, trained), seg in zip(rendered.segments, segment_ids, strict=True):
        ids.extend(seg)
        labels.extend(seg if trained else [IGNORE] * len(seg))
    if rendered.append_eos:
        ids.append(eos)
        labels.append(eos)
    stats.rows += 1
    if len(ids) > cutoff_len:
        stats.truncated += 1
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(t == IGNORE for t in labels):
            stats.skip("no trained token left after the cutoff", rendered.row)
            return None
        stats.eos_lost += rendered.append_eos
    elif all(t == IGNORE for t in labels):
        stats.skip("no trained token", rendered.row)
        return None
    stats.kept += 1
    return Example(rendered.row, ids, labels)


def encode_rows(
    tokenizer, rendered: list[Rendered], cutoff_len: int, stats: EncodeStats | None = None, batch_size: int = 2048
) -> tuple[list[Example], EncodeStats]:
    """Encode rendered rows in batches; returns the kept examples and what was truncated or skipped."""
    stats = stats if stats is not None else EncodeStats()
    bos, eos = bos_id_to_add(tokenizer), tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set one in its tokenizer_config.json")
    examples: list[Example] = []
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start : start + batch_size]
        flat = encode_segments(tokenizer, [text for r in chunk for text, _ in r.segments])
        at = 0
        for r in chunk:
            n = len(r.segments)
            example = build_example(r, flat[at : at + n], bos, eos, cutoff_len, stats)
            at += n
            if example is not None:
                examples.append(example)
    return examples, stats
