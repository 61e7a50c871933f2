"""Prompt rows of online RL (``train.objective: grpo``): read, rendered up to the reply, encoded, audited and split.

A row holds ``prompt`` (text used as it is, as ``prompt_completion`` rows are) or ``messages`` (a conversation
rendered by the chat template with its generation prompt; a final assistant turn is the reference and is left
out), plus the columns its rewards read (``grpo.answer_column``). Prompts are encoded as inference encodes them:
the text alone, BOS in front only when the tokenizer adds one. The audit checks that the template's generation
prompt is exactly the start of a rendered assistant turn (else the model would be sampled from a prompt that
training never rendered), and that each prompt leaves room for ``grpo.max_new_tokens`` within ``data.cutoff_len``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kotune.config import Config
from kotune.data.audit import FATAL, WARNING, AuditReport, Finding, length_stats, row_list
from kotune.data.conversations import ChatRenderer, to_messages
from kotune.data.encoding import bos_id_to_add, encode_segments
from kotune.data.examples import IGNORE, Example
from kotune.data.formats import SkipRow
from kotune.data.read import DataError, apply_columns, read_rows, split_indices

PROBE = "kotune-probe"


@dataclass(frozen=True)
class PromptRow:
    """One prompt of online RL: its ids, its text and the row as read (what the rewards see)."""

    row: int
    ids: list[int]
    text: str
    fields: dict[str, Any]

    @property
    def input_tokens(self) -> int:
        """Prompt tokens (what balances a step's prompts over the processes)."""
        return len(self.ids)


@dataclass
class PreparedPrompts:
    train: list[PromptRow]
    validation: list[PromptRow]
    audits: tuple[AuditReport, ...]
    chat_template: str | None

    def examples(self, split: str) -> list[Example]:
        """The ``split``'s prompts as ``Example`` rows with nothing trained: what ``kotune data`` shows and the
        fingerprint hashes (completions are sampled during training)."""
        part = self.train if split == "train" else self.validation
        return [Example(p.row, p.ids, [IGNORE] * len(p.ids)) for p in part]


def prompt_text(row: dict[str, Any], renderer: ChatRenderer | None, where: str) -> str:
    """The text a row's completion follows: its ``prompt``, or its ``messages`` up to a final assistant turn with
    the chat template's generation prompt."""
    if "prompt" in row and isinstance(row["prompt"], str):
        return row["prompt"]
    if "messages" not in row:
        raise DataError(
            f"{where}: row {row['_row']}: train.objective=grpo needs prompt rows, a 'prompt' text or 'messages' "
            f"column (found {', '.join(k for k in row if not k.startswith('_'))}); map yours with data.columns"
        )
    messages = to_messages(row, "messages", where)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise SkipRow("no turn before the answer to prompt with")
    return renderer.apply(messages, add_generation_prompt=True, source=f"{where} (row {row['_row']})")


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each prompt's ids: the text alone, BOS in front when the tokenizer adds one (and the text lacks it)."""
    bos = bos_id_to_add(tokenizer)
    out = []
    for ids in encode_segments(tokenizer, texts):
        out.append([bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids)
    return out


def generation_prompt_exact(renderer: ChatRenderer) -> bool:
    """Whether the template's generation prompt is the start of an assistant turn it renders: sampling then
    continues exactly where a trained reply begins."""
    user = [{"role": "user", "content": "hi"}]
    prompt = renderer.apply(user, add_generation_prompt=True, source="probe")
    whole = renderer.apply(
        [*user, {"role": "assistant", "content": PROBE}], add_generation_prompt=False, source="probe"
    )
    return whole.startswith(prompt) and PROBE in whole[len(prompt) :]


def read_prompts(spec: str, split: str, cfg: Config, tokenizer) -> tuple[list[PromptRow], AuditReport, str | None]:
    """One source's prompt rows and its audit (the chat template used, None if no row is a conversation)."""
    rows = apply_columns(read_rows(spec, split), cfg.data.columns, spec)
    conversations = any("messages" in r and not isinstance(r.get("prompt"), str) for r in rows)
    renderer = ChatRenderer(tokenizer, cfg.data) if conversations else None
    texts, kept, skipped = [], [], {}
    for row in rows:
        try:
            texts.append(prompt_text(row, renderer, spec))
            kept.append(row)
        except SkipRow as reason:
            skipped[row["_row"]] = str(reason)
    prompts = [
        PromptRow(row["_row"], ids, text, row)
        for row, ids, text in zip(kept, encode_prompts(tokenizer, texts), texts, strict=True)
    ]
    audit = audit_prompts(spec, prompts, len(rows), skipped, cfg, renderer)
    return prompts, audit, renderer.template if renderer else None


def audit_prompts(source, prompts, n_rows, skipped, cfg: Config, renderer) -> AuditReport:
    """Lengths, rows left out, the answer column, prompts too long for a completion, the generation prompt."""
    g, cutoff = cfg.grpo, cfg.data.cutoff_len
    findings = []
    if skipped:
        rows = sorted(skipped)
        findings.append(Finding("skipped", WARNING, f"{len(rows)} rows left out ({row_list(rows)})", rows))
    too_long = [p.row for p in prompts if p.input_tokens + g.max_new_tokens > cutoff]
    if too_long:
        message = (
            f"{len(too_long)} prompts leave less than grpo.max_new_tokens={g.max_new_tokens} tokens within "
            f"data.cutoff_len={cutoff} ({row_list(too_long)}): raise data.cutoff_len or shorten them"
        )
        findings.append(Finding("prompt_too_long", FATAL, message, too_long))
    if "answer" in g.rewards:
        missing = [p.row for p in prompts if p.fields.get(g.answer_column) in (None, "")]
        if missing:
            findings.append(Finding("no_answer", FATAL, f"{len(missing)} rows have no '{g.answer_column}' the "
                                    f"answer reward compares with ({row_list(missing)}); set grpo.answer_column",
                                    missing))  # fmt: skip
    if renderer is not None and not generation_prompt_exact(renderer):
        findings.append(Finding("generation_prompt", FATAL, "the chat template's generation prompt is not the "
                                "start of the assistant turn it renders: completions would follow a prompt training "
                                "never saw; fix data.chat_template"))  # fmt: skip
    if not prompts:
        findings.append(Finding("no_prompts", FATAL, "no row holds a prompt"))
    lengths = np.array([p.input_tokens for p in prompts] or [0])
    stats, histogram = length_stats(lengths)
    tokens = int(lengths.sum())
    return AuditReport(source, "prompts", n_rows, len(prompts), cutoff, stats, histogram, tokens, 0, [], findings)


def prepare_prompts(cfg: Config, tokenizer) -> PreparedPrompts:
    """Train and held-out prompts (``data.validation_path``, else ``data.val_size`` of the rows) with audits."""
    d = cfg.data
    train, audit, chat_template = read_prompts(d.path, d.split, cfg, tokenizer)
    audits = (audit,)
    if d.validation_path:
        validation, val_audit, _ = read_prompts(d.validation_path, "validation", cfg, tokenizer)
        audits = (audit, val_audit)
    else:
        by_row = {p.row: p for p in train}
        train_rows, val_rows = split_indices(audit.rows, d.val_size, d.seed)
        train, validation = [by_row[r] for r in train_rows if r in by_row], [by_row[r] for r in val_rows if r in by_row]
    if d.max_rows is not None:
        train = train[: d.max_rows]
    return PreparedPrompts(train, validation, audits, chat_template)
