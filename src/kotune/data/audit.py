"""The data audit: what would go wrong in training, found over the whole dataset before any GPU time is spent.

``audit_source`` runs on the rows and their encoding (``kotune.data.examples.Encoded``) and returns a JSON-ready
``AuditReport`` (it is cached with the tokenized data). ``kotune.model.embeddings.add_model_checks`` adds what
needs the base model's weights: special tokens the data uses whose embedding rows look untrained. Row ids are
``_row``: a row's position in its source, counted from 0.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kotune.data.batching import collate
from kotune.data.chat_audit import empty_think_rows, rendering_differences, tool_call_problems, trained_parts
from kotune.data.encoding import bos_id_to_add, encode_segments
from kotune.data.examples import IGNORE, Encoded
from kotune.data.formats import CHAT_FORMATS, OPTIONAL_COLUMNS, Rendered, used_columns
from kotune.data.templates import Template, placeholders

FATAL, WARNING, INFO = "fatal", "warning", "info"
HANGUL = re.compile("[\uac00-\ud7a3]+")
HANGUL_SAMPLE_ROWS = 256
"""Rows (spread over the dataset) whose Hangul is tokenized to measure tokens per syllable (~10^4 syllables
for typical rows: enough for two decimals, and a small cost next to encoding the whole dataset)."""
COLLATE_SAMPLE_ROWS = 16
"""Rows collated to check that the closing EOS / end-of-turn token still reaches the labels."""
NO_TRAINED = ("no trained token", "no trained token left after the cutoff")


@dataclass
class Finding:
    code: str
    """Short name of the check, e.g. ``truncated``."""
    level: str
    """``fatal`` (training would be ruined: the run stops), ``warning`` or ``info``."""
    message: str
    rows: list[int] = field(default_factory=list)
    """All row ids concerned (``_row``)."""
    tokens: list[int] = field(default_factory=list)
    """Token ids concerned (``untrained_special_tokens``)."""


@dataclass
class AuditReport:
    source: str
    format: str
    rows: int
    kept: int
    cutoff_len: int
    lengths: dict[str, int]
    """Tokens per row before the cutoff: min, median, p95, max."""
    histogram: list[list[int]]
    """``[low, high, rows]`` bins of the token lengths."""
    tokens: int
    trained_tokens: int
    special_ids: list[int]
    """Special tokens the encoded data uses."""
    findings: list[Finding] = field(default_factory=list)
    trained_parts: dict[str, int] = field(default_factory=dict)
    """Conversations: trained tokens by part (reasoning, content, tool_calls, end, empty_think) within the cutoff."""

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def fatal(self) -> list[Finding]:
        return [f for f in self.findings if f.level == FATAL]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trained_share": round(self.trained_share, 4)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditReport:
        data = {k: v for k, v in data.items() if k != "trained_share"}
        return cls(**{**data, "findings": [Finding(**f) for f in data["findings"]]})


def row_list(rows: list[int], limit: int = 10) -> str:
    """``rows 3, 7, 12`` with at most ``limit`` shown."""
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f" … (+{len(rows) - limit} more)" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def nearest_rank(sorted_values: np.ndarray, q: float) -> int:
    """The q-th percentile by nearest rank: always a value that occurs."""
    return int(sorted_values[max(0, int(np.ceil(q / 100 * len(sorted_values))) - 1)])


def length_stats(lengths: np.ndarray, bins: int = 10) -> tuple[dict[str, int], list[list[int]]]:
    """min / median / p95 / max and equal-width histogram bins of token lengths."""
    if not len(lengths):
        return {"min": 0, "median": 0, "p95": 0, "max": 0}, []
    ordered = np.sort(lengths)
    stats = {"min": int(ordered[0]), "median": nearest_rank(ordered, 50), "p95": nearest_rank(ordered, 95)}
    stats["max"] = int(ordered[-1])
    edges = np.unique(np.linspace(stats["min"], stats["max"] + 1, bins + 1).astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    return stats, [[int(edges[i]), int(edges[i + 1] - 1), int(c)] for i, c in enumerate(counts)]


def audit_source(
    source: str,
    rows: list[dict[str, Any]],
    fmt: str,
    template: Template,
    encoded: Encoded,
    tokenizer,
    cutoff_len: int,
    rendered: list[Rendered] | None = None,
) -> AuditReport:
    """Every check that needs only the data and the tokenizer (``rendered``: the rows' segments, for the
    conversation checks)."""
    encoded_rows = encoded.length > 0
    stats, histogram = length_stats(encoded.length[encoded_rows])
    labels = encoded.examples.labels
    report = AuditReport(
        source=source,
        format=fmt,
        rows=len(rows),
        kept=len(encoded.examples),
        cutoff_len=cutoff_len,
        lengths=stats,
        histogram=histogram,
        tokens=int(encoded.examples.lengths().sum()),
        trained_tokens=int((labels != IGNORE).sum()),
        special_ids=special_ids_used(encoded, tokenizer),
    )
    report.findings += _cutoff_findings(encoded, cutoff_len) + _skip_findings(encoded)
    report.findings += _empty_fields(rows, fmt)  # duplicates: kotune.data.dedup, across sources too
    report.findings += _columns(rows, fmt, template)
    report.findings.append(_eos_reaches_labels(encoded, tokenizer))
    if fmt in CHAT_FORMATS and rendered is not None and encoded.segment_tokens is not None:
        bos = bos_id_to_add(tokenizer) is not None
        report.trained_parts, cut = trained_parts(rendered, encoded.segment_tokens, bos, cutoff_len)
        report.findings += _conversation_findings(rows, fmt, source, rendered, cut, cutoff_len)
    hangul = _hangul_coverage(rows, fmt, tokenizer, cutoff_len)
    if hangul is not None:
        report.findings.append(hangul)
    return report


def special_ids_used(encoded: Encoded, tokenizer) -> list[int]:
    special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    special.update(tokenizer.all_special_ids)
    ids = encoded.examples.ids
    return sorted(int(i) for i in np.unique(ids[np.isin(ids, np.fromiter(special, dtype=np.int64))]))


def _cutoff_findings(encoded: Encoded, cutoff_len: int) -> list[Finding]:
    out = []
    truncated = np.flatnonzero(encoded.truncated).tolist()
    if truncated:
        out.append(
            Finding(
                "truncated",
                WARNING,
                f"{len(truncated)} rows are longer than cutoff_len={cutoff_len} and are cut ({row_list(truncated)})",
                truncated,
            )
        )
    lost = np.flatnonzero(encoded.eos_lost).tolist()
    if lost:
        out.append(
            Finding(
                "eos_lost",
                WARNING,
                f"{len(lost)} rows lost their EOS / end-of-turn token to the cutoff, "
                f"so they never teach the model to stop ({row_list(lost)}); raise data.cutoff_len",
                lost,
            )
        )
    return out


def _skip_findings(encoded: Encoded) -> list[Finding]:
    out = []
    codes = {reason: i for i, reason in enumerate(encoded.reasons)}
    no_trained = np.flatnonzero(np.isin(encoded.skip, [codes[r] for r in NO_TRAINED])).tolist()
    if no_trained:
        out.append(
            Finding(
                "no_trained_tokens",
                WARNING,
                f"{len(no_trained)} rows have no trainable token and are skipped ({row_list(no_trained)})",
                no_trained,
            )
        )
    for reason, i in codes.items():
        rows = np.flatnonzero(encoded.skip == i).tolist()
        if rows and reason not in NO_TRAINED:
            out.append(Finding("skipped", WARNING, f"{len(rows)} rows skipped: {reason} ({row_list(rows)})", rows))
    if len(encoded.examples) == 0:
        every = list(range(len(encoded.skip)))
        out.append(
            Finding(
                "nothing_to_train",
                FATAL,
                f"no row has a trainable token ({row_list(every)}); training would learn nothing "
                "(check the columns, data.train_on_inputs and data.cutoff_len)",
                every,
            )
        )
    return out


def _row_texts(row: dict[str, Any], fmt: str) -> dict[str, str]:
    """The text fields of a row by column (conversation turns as ``messages[i]``; a turn of tool calls has none)."""
    if fmt in ("messages", "sharegpt"):
        key, text = ("messages", "content") if fmt == "messages" else ("conversations", "value")
        turns = row.get(key) if isinstance(row.get(key), list) else []
        return {
            f"{key}[{i}]": t.get(text) for i, t in enumerate(turns) if isinstance(t, dict) and not t.get("tool_calls")
        }
    return {c: row.get(c) for c in used_columns(fmt)}


def _empty_fields(rows: list[dict[str, Any]], fmt: str) -> list[Finding]:
    optional = OPTIONAL_COLUMNS.get(fmt, ())
    empty: dict[str, list[int]] = {}
    for row in rows:
        for column, value in _row_texts(row, fmt).items():
            if isinstance(value, str) and (not value or value.isspace()) and column not in optional:
                empty.setdefault(column.split("[")[0], []).append(row["_row"])
    return [
        Finding(
            "empty_field",
            WARNING,
            f"column '{c}' is empty or whitespace in {len(set(r))} rows ({row_list(r)})",
            sorted(set(r)),
        )
        for c, r in empty.items()
    ]


def _columns(rows: list[dict[str, Any]], fmt: str, template: Template) -> list[Finding]:
    present = sorted({c for row in rows for c in row if not c.startswith("_")})
    out = []
    unused = [c for c in present if c not in used_columns(fmt)]
    if unused:
        out.append(
            Finding(
                "unused_columns",
                WARNING,
                f"columns not used by format {fmt}: {', '.join(unused)} "
                "(map one with data.columns if it holds the prompt or response)",
            )
        )
    if fmt == "alpaca":
        wanted = placeholders(template.prompt_input) | placeholders(template.prompt_no_input)
        absent = sorted(p for p in wanted if p not in present)
        shown = ", ".join("{" + p + "}" for p in sorted(wanted))
        text = f"template '{template.name}' placeholders {shown}; columns {', '.join(present)}"
        if absent:
            text += f"; no column for {', '.join('{' + p + '}' for p in absent)} (every row uses prompt_no_input)"
        out.append(Finding("template_columns", INFO, text))
    return out


REASONING_DROPPED_HINT = (
    "; templates such as Qwen3's drop the reasoning of turns before the last user message, so it is not trained "
    "(split such conversations into one row per turn to train it)"
)


def _conversation_findings(
    rows: list[dict[str, Any]], fmt: str, source: str, rendered: list[Rendered], cut: list[int], cutoff_len: int
) -> list[Finding]:
    """Reasoning cut by the cutoff, turns rendered differently from the data, empty think blocks the template
    inserted, and tool calls that do not fit their tool's schema."""
    out = []
    if cut:
        out.append(
            Finding(
                "reasoning_cut",
                WARNING,
                f"{len(cut)} rows have reasoning that cutoff_len={cutoff_len} cuts ({row_list(cut)}): the model "
                "learns to think without concluding; raise data.cutoff_len",
                cut,
            )
        )
    for what, where in rendering_differences(rendered).items():
        hint = REASONING_DROPPED_HINT if what == "reasoning dropped" else ""
        text = f"the chat template renders an assistant turn differently from the data: {what} in {len(where)} rows"
        out.append(
            Finding(
                "rendered_differently",
                WARNING,
                f"{text} ({row_list(where)}); what is trained is what the template renders{hint}",
                where,
            )
        )
    empty, trained = empty_think_rows(rendered)
    if empty:
        text = f"{len(empty)} rows have an empty think block the chat template inserted ({row_list(empty)}); "
        if trained:
            text += "trained, so the model learns to answer without thinking (data.drop_empty_think masks them)"
        out.append(Finding("empty_think", WARNING if trained else INFO, text + ("" if trained else "masked"), empty))
    problems = tool_call_problems(rows, fmt, source)
    if problems:
        bad = sorted(problems)
        first = problems[bad[0]][0]
        out.append(
            Finding(
                "tool_call_invalid",
                WARNING,
                f"{len(bad)} rows have tool calls that do not fit their tool's schema ({row_list(bad)}); "
                f"row {bad[0]}: {first}",
                bad,
            )
        )
    return out


def _eos_reaches_labels(encoded: Encoded, tokenizer) -> Finding:
    """Collate rows the way training does and check their closing token is still a label."""
    table = encoded.examples
    whole = np.flatnonzero(~encoded.truncated[table.rows])
    pick = whole[np.linspace(0, len(whole) - 1, min(len(whole), COLLATE_SAMPLE_ROWS)).astype(int)] if len(whole) else []
    batch = [table[int(i)] for i in pick]
    batch = [e for e in batch if e.labels[-1] != IGNORE]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    same = f"pad == eos ({tokenizer.eos_token}); " if pad == eos else ""
    if not batch:
        return Finding("eos_in_labels", INFO, f"{same}no untruncated row ends in a trained token to check")
    labels = collate(batch, pad if pad is not None else eos)["labels"]
    reached = [e.row for i, e in enumerate(batch) if int(labels[i, len(e.input_ids) - 1]) == e.input_ids[-1]]
    missing = [e.row for e in batch if e.row not in reached]
    text = f"{same}the closing EOS / end-of-turn token reaches the labels in {len(reached)}/{len(batch)} sampled rows"
    return Finding("eos_in_labels", FATAL if missing else INFO, text, missing)


def _hangul_coverage(rows: list[dict[str, Any]], fmt: str, tokenizer, cutoff_len: int) -> Finding | None:
    """Tokens per Hangul syllable over the Hangul of up to ``HANGUL_SAMPLE_ROWS`` rows spread over the data."""
    step = max(1, len(rows) // HANGUL_SAMPLE_ROWS)
    texts = []
    for row in rows[::step]:
        runs = [run for v in _row_texts(row, fmt).values() if isinstance(v, str) for run in HANGUL.findall(v)]
        if runs:
            texts.append(" ".join(runs))
    syllables = sum(len(t.replace(" ", "")) for t in texts)
    if not syllables:
        return None
    ratio = sum(map(len, encode_segments(tokenizer, texts))) / syllables
    fits = int(cutoff_len / ratio)
    return Finding(
        "hangul",
        INFO,
        f"{ratio:.2f} tokens per Hangul syllable ({syllables} syllables in {len(texts)} sampled rows): "
        f"cutoff_len={cutoff_len} holds about {fits} syllables",
    )


SAMPLED = "prompts only: GRPO trains on the completions it samples"
"""What the audit says of trained tokens for prompt rows (``data.prompts``), which hold none."""


def summary_lines(report: AuditReport) -> list[str]:
    """A few lines for ``kotune train``: the shape of the data, then every warning and fatal problem."""
    s = report.lengths
    head = (
        f"kotune: audit {report.source} ({report.format}): {report.rows} rows, {report.kept} trainable; tokens "
        f"median {s['median']} / p95 {s['p95']} / max {s['max']} (cutoff {report.cutoff_len}); "
        + (SAMPLED if report.format == "prompts" else f"{100 * report.trained_share:.1f}% of tokens trained")
    )
    hangul = next((f.message.split(" (")[0] for f in report.findings if f.code == "hangul"), None)
    lines = [head + (f"; {hangul}" if hangul else "")]
    if report.trained_parts:
        lines.append(f"kotune: audit: trained tokens by part: {parts_line(report)}")
    for finding in report.findings:
        if finding.level != INFO:
            lines.append(f"kotune: audit: {finding.level}: {finding.message}")
    return lines


def parts_line(report: AuditReport) -> str:
    """``reasoning 41.0% · content 52.3% · ...``: each part's share of the trained tokens."""
    total = sum(report.trained_parts.values()) or 1
    return " · ".join(f"{kind} {100 * n / total:.1f}%" for kind, n in report.trained_parts.items())


def fatal_error(reports: tuple[AuditReport, ...]) -> str | None:
    """The message that stops a run, naming every fatal problem; None when there is none."""
    fatal = [f"{r.source}: {f.message}" for r in reports for f in r.fatal()]
    if not fatal:
        return None
    return "the data audit found problems that would ruin training:\n  - " + "\n  - ".join(fatal)
