"""Tokenization and labels, exact by construction.

Each segment of a rendered row is encoded on its own (no special tokens), the ids are concatenated, BOS is
put in front once when the tokenizer's own encoding starts with it, and EOS closes the response. Labels copy
the ids of trained segments and hold -100 elsewhere, so the mask cannot shift whatever the tokenizer merges.

Many rows are encoded in batches (the tokenizer spreads a batch over the cores) into an ``ExampleTable``: ids
and labels of all rows in two flat arrays, so a table can be cached and memory-mapped back without a copy.
While the tokenizer encodes one batch (it releases Python's lock), the next is prepared and the last assembled.
For tokenizers whose ids provably do not change when a text is cut before a word (``cuts_at_words``), a batch is
cut into words and each distinct word is encoded once: the tokenizer sees a small part of the text.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import numpy as np

from kotune.data.examples import IGNORE, Encoded, ExampleTable
from kotune.data.formats import Rendered


def bos_id_to_add(tokenizer) -> int | None:
    """BOS to put in front, only if the tokenizer itself starts encodings with it (mirrors pretraining)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def encode_segments(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, encoded alone, without special tokens, in one batched call.

    A fast tokenizer's Rust backend is called directly (``encode_batch_fast``: no offsets, no Python per-text
    work); it is what ``tokenizer(texts)`` runs too, and tests check the ids are the same.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


# Cutting a text into pieces and encoding each piece alone gives the same ids as encoding it whole when every
# cut falls where the pre-tokenizer puts a boundary anyway and no pre-token next to it looks across it. For the
# pre-tokenizer regex of Llama 3 (and of Qwen 2, with \p{N} for \p{N}{1,3}) two kinds of cut are such places:
# - before a space that follows a non-space character: no alternative matches a non-space character followed by
#   a space (letters, digits and punctuation runs exclude spaces, and [\r\n]* takes only newlines), and the
#   match ending before the cut stops there whatever follows, as it stops at the end of the text;
# - after a newline that a non-space character follows: only whitespace alternatives match a newline, none of
#   them can go on into a non-space character, and \s*[\r\n]+ (tried before the one lookahead, \s+(?!\S))
#   takes the newline whether the text goes on or not.
# The regex has no lookbehind, so matching after a cut starts as it would at the start of a text. GPT-2's regex
# lacks the second property: "a \n" + "b" pre-tokenizes as " ", "\n" whole but " \n" alone.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
CUT_SAFE_PATTERNS = (LLAMA3_SPLIT, LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"))
LINE_STARTS = re.compile(r"(?<=\n)(?=\S)")
SPACE_AFTER_SPACE = re.compile(r"\s ")
"""Python's \\s counts every character the regex's \\s does as whitespace (and a few more), so a character it
calls non-space is non-space for the regex too: no cut is made that the argument above does not cover."""


def cuts_at_words(tokenizer) -> bool:
    """Whether cutting a text before a space after a non-space character, or after a newline before a non-space
    character, leaves its ids unchanged (see ``CUT_SAFE_PATTERNS``).

    True only for a fast tokenizer with no normalizer, whose pre-tokenizer is one of ``CUT_SAFE_PATTERNS``
    (isolated) followed by byte-level mapping without a prefix space, and whose added tokens hold no space or
    newline and strip nothing around them (added tokens are matched in the text before pre-tokenization).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False) or backend.normalizer is not None:
        return False
    if backend.pre_tokenizer is None:
        return False
    state = json.loads(backend.pre_tokenizer.__getstate__())
    steps = state.get("pretokenizers", [state]) if state.get("type") == "Sequence" else [state]
    expected = [
        {"type": "Split", "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
    ]
    if len(steps) != len(expected):
        return False
    if any(step.get(key) != value for step, want in zip(steps, expected, strict=True) for key, value in want.items()):
        return False
    if steps[0].get("pattern", {}).get("Regex") not in CUT_SAFE_PATTERNS:
        return False
    return not any(
        " " in t.content or "\n" in t.content or t.lstrip or t.rstrip
        for t in backend.get_added_tokens_decoder().values()
    )


def word_pieces(text: str) -> list[str]:
    """``text`` cut as ``cuts_at_words`` allows: words with their leading space, lines split where they start."""
    if SPACE_AFTER_SPACE.search(text):  # a space after whitespace: that cut is not covered; cut at lines only
        return LINE_STARTS.split(text) if "\n" in text else [text]
    first, *rest = text.split(" ")
    pieces = [first, *[" " + word for word in rest]]
    if "\n" in text:
        pieces = [line for piece in pieces for line in (LINE_STARTS.split(piece) if "\n" in piece else (piece,))]
    return pieces


def encode_flat(tokenizer, texts: list[str], by_word: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ids of ``texts`` end to end (int32) and the count of each, as ``encode_segments`` gives them.

    ``by_word`` (only where ``cuts_at_words`` holds): cut each text into ``word_pieces``, encode each distinct
    piece once, and lay the pieces' ids back in order. Text repeats at the word level, so the tokenizer sees a
    small part of the text; the ids are the same (``tests/test_data_encoding.py`` checks it on crafted text).
    """
    if not by_word:
        ids = encode_segments(tokenizer, texts)
        counts = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(chain.from_iterable(ids), np.int32, int(counts.sum())), counts
    if not texts:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    distinct: dict[str, int] = {}
    order: list[int] = []
    pieces_per_text = np.empty(len(texts), np.int64)
    for i, text in enumerate(texts):
        pieces = word_pieces(text)
        pieces_per_text[i] = len(pieces)
        order.extend([distinct.setdefault(piece, len(distinct)) for piece in pieces])
    piece_ids, piece_counts = encode_flat(tokenizer, list(distinct))
    piece_order = np.asarray(order, np.int64)
    counts = piece_counts[piece_order]
    source_start = np.cumsum(piece_counts) - piece_counts
    target_start = np.cumsum(counts) - counts
    gather = np.arange(int(counts.sum())) + np.repeat(source_start[piece_order] - target_start, counts)
    text_counts = np.add.reduceat(counts, np.cumsum(pieces_per_text) - pieces_per_text)
    return piece_ids[gather], text_counts


def _special_ids(tokenizer) -> tuple[int | None, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set one in its tokenizer_config.json")
    return bos_id_to_add(tokenizer), eos


@dataclass
class Batch:
    """Rows of one batch assembled at once: per-row counts, and the tokens of the rows that train."""

    length: np.ndarray
    """Tokens per row before the cutoff."""
    trained: np.ndarray
    """Trained tokens per row after the cutoff (0: the row cannot train)."""
    ends_trained: np.ndarray
    """Per row: ends in a trained closing token (EOS or an end-of-turn token)."""
    ids: np.ndarray
    """Ids of the rows with ``trained > 0``, cut at the cutoff, flat."""
    labels: np.ndarray


def assemble_batch(
    rendered: list[Rendered], flat: np.ndarray, seg_len: np.ndarray, bos: int | None, eos: int, cutoff_len: int
) -> Batch:
    """``assemble`` and ``apply_cutoff`` for many rows with array operations instead of a loop per row.

    ``flat`` holds the ids of every segment of ``rendered`` end to end, ``seg_len`` the count of each.
    """
    n = len(rendered)
    n_segments = np.fromiter((len(r.segments) for r in rendered), np.int64, n)
    seg_trained = np.fromiter((t for r in rendered for _, t in r.segments), bool, len(seg_len))
    append_eos = np.fromiter((r.append_eos for r in rendered), bool, n)
    n_bos = int(bos is not None)
    seg_row = np.repeat(np.arange(n), n_segments)
    body = np.bincount(seg_row, weights=seg_len, minlength=n).astype(np.int64)  # segment tokens per row
    length = n_bos + body + append_eos
    start = np.cumsum(length) - length
    # Each segment token moves from its place in ``flat`` to its row's start, behind BOS.
    token_row = np.repeat(seg_row, seg_len)
    dest = np.arange(len(flat)) + (start - (np.cumsum(body) - body) + n_bos)[token_row]
    ids = np.empty(int(length.sum()), np.int32)
    labels = np.full(len(ids), IGNORE, np.int32)
    ids[dest] = flat
    token_trained = np.repeat(seg_trained, seg_len)
    labels[dest[token_trained]] = flat[token_trained]
    if bos is not None:
        ids[start] = bos
    closing = (start + length - 1)[append_eos]
    ids[closing], labels[closing] = eos, eos
    position_row = np.repeat(np.arange(n), length)
    within = np.arange(len(ids)) - start[position_row] < cutoff_len
    trained = np.bincount(position_row[within & (labels != IGNORE)], minlength=n)
    last_segment = seg_trained[np.maximum(np.cumsum(n_segments) - 1, 0)] if len(seg_trained) else np.zeros(n, bool)
    keep = within & (trained > 0)[position_row]
    return Batch(length, trained, append_eos | (last_segment & (n_segments > 0)), ids[keep], labels[keep])


def encode_table(
    tokenizer, rendered: list[Rendered], n_rows: int, skipped: dict[int, str], cutoff_len: int, batch_size: int = 4096
) -> Encoded:
    """Encode rendered rows in batches into an ``Encoded``; ``skipped`` holds rows left out before encoding.

    One worker thread encodes batch k+1 (the tokenizer runs without Python's lock, on all cores) while this
    thread assembles batch k.
    """
    bos, eos = _special_ids(tokenizer)
    by_word = cuts_at_words(tokenizer)
    reasons = sorted(set(skipped.values()) | {"no trained token", "no trained token left after the cutoff"})
    code = {reason: i for i, reason in enumerate(reasons)}
    length = np.zeros(n_rows, dtype=np.int64)
    truncated = np.zeros(n_rows, dtype=bool)
    eos_lost = np.zeros(n_rows, dtype=bool)
    skip = np.full(n_rows, -1, dtype=np.int16)
    for row, reason in skipped.items():
        skip[row] = code[reason]
    empty = np.zeros(0, np.int64)
    parts = [(empty, empty, empty.astype(np.int32), empty.astype(np.int32))]  # rows, lengths, ids, labels
    segment_tokens = [empty]
    chunks = [rendered[start : start + batch_size] for start in range(0, len(rendered), batch_size)]

    def encode(chunk: list[Rendered]) -> tuple[np.ndarray, np.ndarray]:
        return encode_flat(tokenizer, [t for r in chunk for t, _ in r.segments], by_word)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kotune-encode") as worker:
        pending = [worker.submit(encode, chunk) for chunk in chunks[:2]]
        for k, chunk in enumerate(chunks):
            flat, seg_len = pending[k].result()
            segment_tokens.append(seg_len)
            if k + 2 < len(chunks):
                pending.append(worker.submit(encode, chunks[k + 2]))
            pending[k] = None  # free the batch's ids once assembled
            rows = np.fromiter((r.row for r in chunk), np.int64, len(chunk))
            batch = assemble_batch(chunk, flat, seg_len, bos, eos, cutoff_len)
            cut, kept = batch.length > cutoff_len, batch.trained > 0
            length[rows], truncated[rows] = batch.length, cut
            skip[rows[~kept & cut]] = code["no trained token left after the cutoff"]
            skip[rows[~kept & ~cut]] = code["no trained token"]
            eos_lost[rows] = kept & cut & batch.ends_trained
            parts.append((rows[kept], np.minimum(batch.length, cutoff_len)[kept], batch.ids, batch.labels))
    examples = ExampleTable.from_arrays(*(np.concatenate([p[i] for p in parts]) for i in range(4)))
    return Encoded(examples, length, truncated, eos_lost, skip, reasons, np.concatenate(segment_tokens))
