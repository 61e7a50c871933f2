"""The per-row reference encoder: each row assembled and cut on its own, with lists.

``kotune.data.encoding.encode_table`` does the same for many rows at once with array operations; tests compare
the two (and the masks against the seed's method) row by row. Test-only code, so it lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

from kotune.data.encoding import _special_ids, encode_segments
from kotune.data.examples import IGNORE, EncodeStats, Example
from kotune.data.formats import Rendered


@dataclass
class Assembled:
    """One row's ids and labels before the cutoff."""

    input_ids: list[int]
    labels: list[int]
    ends_trained: bool
    """The row ends in a trained token that closes a response (EOS or an end-of-turn token)."""


def assemble(rendered: Rendered, segment_ids: list[list[int]], bos: int | None, eos: int) -> Assembled:
    """Concatenate a row's encoded segments behind BOS, mask untrained ones, close with EOS if asked."""
    ids: list[int] = [bos] if bos is not None else []
    labels: list[int] = [IGNORE] * len(ids)
    for (_, trained), seg in zip(rendered.segments, segment_ids, strict=True):
        ids.extend(seg)
        labels.extend(seg if trained else [IGNORE] * len(seg))
    if rendered.append_eos:
        ids.append(eos)
        labels.append(eos)
    ends_trained = rendered.append_eos or bool(rendered.segments and rendered.segments[-1][1])
    return Assembled(ids, labels, ends_trained)


def apply_cutoff(row: Assembled, cutoff_len: int) -> tuple[list[int], list[int], str | None]:
    """Ids and labels cut at the cutoff, and why the row cannot train (None when it can)."""
    ids, labels = row.input_ids, row.labels
    if len(ids) > cutoff_len:
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(t == IGNORE for t in labels):
            return ids, labels, "no trained token left after the cutoff"
    elif all(t == IGNORE for t in labels):
        return ids, labels, "no trained token"
    return ids, labels, None


def build_example(
    rendered: Rendered,
    segment_ids: list[list[int]],
    bos: int | None,
    eos: int,
    cutoff_len: int,
    stats: EncodeStats,
) -> Example | None:
    """Concatenate a row's encoded segments, mask untrained ones, apply the cutoff; None if nothing is trained."""
    row = assemble(rendered, segment_ids, bos, eos)
    ids, labels, reason = apply_cutoff(row, cutoff_len)
    stats.rows += 1
    truncated = len(row.input_ids) > cutoff_len
    stats.truncated += truncated
    if reason is not None:
        stats.skip(reason, rendered.row)
        return None
    stats.eos_lost += truncated and row.ends_trained
    stats.kept += 1
    return Example(rendered.row, ids, labels)


def encode_rows(
    tokenizer, rendered: list[Rendered], cutoff_len: int, stats: EncodeStats | None = None, batch_size: int = 2048
) -> tuple[list[Example], EncodeStats]:
    """Encode rendered rows in batches; returns the kept examples and what was truncated or skipped."""
    stats = stats if stats is not None else EncodeStats()
    bos, eos = _special_ids(tokenizer)
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


# -- conversations: assistant turns read off the template's own ids ------------------------------------------------
@dataclass(frozen=True)
class TurnMarkers:
    """Token texts that frame an assistant turn in one chat template's ids."""

    opener: str
    """What the generation prompt ends with, e.g. ``<|im_start|>assistant\\n``."""
    closer: str
    """The end-of-turn token."""
    think: tuple[str, str] = ("<think>", "</think>")
    tool_call: str = "<tool_call>"
    """Where tool calls start when the template marks them (Qwen3); a turn whose text starts with
    ``{"name": `` (Llama 3.1's custom tool call) is tool calls throughout."""


def reference_kinds(tokenizer, ids: list[int], markers: TurnMarkers) -> list[tuple[int, str] | None]:
    """Per token: ``(assistant turn, kind)`` inside an assistant turn (kinds: reasoning, empty_think, content,
    tool_calls, end), None elsewhere. Reads token ids only: the opener's ids, the closer, the think and tool-call
    tokens (tokens of newlines only after ``</think>`` go with the think block; a block with only whitespace in it
    is an empty one)."""
    opener = tokenizer.encode(markers.opener, add_special_tokens=False)
    closer, think_open, think_close, tool_open = tokenizer.convert_tokens_to_ids(
        [markers.closer, *markers.think, markers.tool_call]
    )
    out: list[tuple[int, str] | None] = []
    turn, inside, kind, think_from = -1, False, None, None
    for i, token in enumerate(ids):
        if not inside:
            out.append(None)
            if ids[max(0, i - len(opener) + 1) : i + 1] == opener:
                turn, inside, kind = turn + 1, True, "content"
                json_call = tokenizer.decode(ids[i + 1 : i + 4]).startswith('{"name"')
                kind = "tool_calls" if json_call else "content"
            continue
        if token == closer:
            out.append((turn, "end"))
            inside = False
            continue
        if token == think_open and kind == "content":
            kind, think_from = "reasoning", len(out)
        elif token == tool_open:
            kind = "tool_calls"
        elif kind == "after_think" and tokenizer.decode([token]).strip("\n"):
            kind = "content"
        out.append((turn, "reasoning" if kind == "after_think" else kind))
        if token == think_close and kind == "reasoning":
            kind = "after_think"
            if not tokenizer.decode(ids[think_from + 1 : i]).strip():
                out[think_from:] = [(turn, "empty_think")] * (len(out) - think_from)
        if kind == "after_think" and out[-1] and out[think_from][1] == "empty_think":
            out[-1] = (turn, "empty_think")
    return out


def reference_trained(
    kinds: list[tuple[int, str] | None], last_turn_only=False, mask_history_reasoning=False, drop_empty_think=False
) -> list[bool]:
    """Which tokens the data options train, from ``reference_kinds``."""
    last = max((k[0] for k in kinds if k), default=-1)
    trained = []
    for k in kinds:
        if k is None:
            trained.append(False)
            continue
        turn, kind = k
        trained.append(
            not (last_turn_only and turn != last)
            and not (mask_history_reasoning and turn != last and kind == "reasoning")
            and not (drop_empty_think and kind == "empty_think")
        )
    return trained
