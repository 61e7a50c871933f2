"""From config to tokenized train / validation examples: read, map columns, check, render, encode, audit, split.

Each data source (``data.path``, and ``data.validation_path`` when set) is encoded whole and audited once; the
result is cached (``kotune.data.cache``), so a second run with the same inputs skips straight to the split.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kotune import output
from kotune.config import DataConfig
from kotune.data import cache
from kotune.data.audit import AuditReport, audit_source
from kotune.data.encoding import encode_table
from kotune.data.examples import Encoded, EncodeStats, Example
from kotune.data.formats import (
    CHAT_FORMATS,
    Rendered,
    SkipRow,
    check_columns,
    detect_format,
    render_alpaca,
    render_prompt_completion,
    used_columns,
)
from kotune.data.read import apply_columns, check_types, read_rows, split_indices
from kotune.data.templates import Template, load_template


@dataclass
class Prepared:
    train: Sequence[Example]
    validation: Sequence[Example]
    train_stats: EncodeStats
    validation_stats: EncodeStats
    template: Template
    format: str
    chat_template: str | None = None
    """The chat template conversations were rendered with (None for other formats)."""
    audits: tuple[AuditReport, ...] = ()
    """The audit of ``data.path``, then of ``data.validation_path`` when set."""


@dataclass
class Source:
    """One data source encoded whole, with its audit."""

    encoded: Encoded
    format: str
    audit: AuditReport


def render_rows(
    rows: list[dict[str, Any]], fmt: str, data: DataConfig, template: Template, tokenizer
) -> tuple[list[Rendered], dict[int, str]]:
    """Each row as segments, and the rows that cannot train (e.g. a null output) with the reason."""
    where = data.path
    rendered, skipped = [], {}
    renderer = None
    if fmt in CHAT_FORMATS:
        from kotune.data.conversations import ChatRenderer

        renderer = ChatRenderer(tokenizer, data)
    for row in rows:
        try:
            if fmt == "alpaca":
                rendered.append(render_alpaca(row, template, data.train_on_inputs, where))
            elif fmt == "prompt_completion":
                rendered.append(render_prompt_completion(row, data.train_on_inputs, where))
            else:
                rendered.append(renderer.render(row, fmt, where))
        except SkipRow as reason:
            skipped[row["_row"]] = str(reason)
    return rendered, skipped


def token_kinds_of_rows(data: DataConfig, tokenizer, row_ids: list[int], split: str) -> dict[int, list[str]]:
    """For conversation data: the part (``kotune.data.turn_parts`` kinds) of each token of the rows ``row_ids`` of
    the training source (``split="validation"``: of ``data.validation_path`` when set); other formats: empty."""
    spec = data.validation_path if split == "validation" and data.validation_path else data.path
    rows = apply_columns(read_rows(spec, split if spec == data.validation_path else data.split), data.columns, spec)
    fmt = data.format if data.format != "auto" else detect_format(rows, spec)
    if fmt not in CHAT_FORMATS:
        return {}
    from kotune.data.conversations import ChatRenderer, token_kinds

    renderer, wanted = ChatRenderer(tokenizer, data), set(row_ids)
    return {
        row["_row"]: token_kinds(renderer.render(row, fmt, spec), tokenizer) for row in rows if row["_row"] in wanted
    }


def chat_template_for(data: DataConfig, tokenizer) -> str | None:
    """The chat template conversations would use, None when neither the config nor the tokenizer has one."""
    from kotune.data.conversations import resolve_chat_template
    from kotune.data.templates import TemplateError

    try:
        return resolve_chat_template(data.chat_template, tokenizer)
    except TemplateError:
        if data.chat_template is not None:
            raise
        return None


def encode_source(spec: str, split: str, data: DataConfig, tokenizer, template: Template, log: Callable) -> Source:
    """Read, check, render, encode and audit one source, or take it from the cache."""
    templates = {"prompt": f"{template.prompt_input}\x00{template.prompt_no_input}"}
    templates["chat"] = chat_template_for(data, tokenizer)
    key = cache.cache_key(spec, data, tokenizer, templates) if data.cache else None
    hit = cache.load(key) if key else None
    if hit is not None:
        encoded, meta = hit
        log(f"kotune: data: {spec}: reused the tokenized data cached in {cache.data_cache_dir() / key}")
        return Source(encoded, meta["format"], AuditReport.from_dict(meta["audit"]))
    start = time.perf_counter()
    rows = apply_columns(read_rows(spec, split), data.columns, spec)
    fmt = data.format if data.format != "auto" else detect_format(rows, spec)
    check_columns(rows, fmt, spec)
    check_types(rows, used_columns(fmt))
    rendered, skipped = render_rows(rows, fmt, data, template, tokenizer)
    encoded = encode_table(tokenizer, rendered, len(rows), skipped, data.cutoff_len)
    audit = audit_source(spec, rows, fmt, template, encoded, tokenizer, data.cutoff_len, rendered)
    took = f"kotune: data: {spec}: tokenized {len(rows)} rows in {time.perf_counter() - start:.1f}s"
    if key:
        folder = cache.save(key, encoded, {"format": fmt, "audit": audit.to_dict(), "source": spec})
        took += f"; cached in {folder}"
    log(took)
    return Source(encoded, fmt, audit)


def prepare(data: DataConfig, tokenizer, log: Callable[[str], None] = output.status) -> Prepared:
    """Tokenized examples for training and validation, with counts of what was truncated or skipped."""
    template = load_template(data.template)
    main = encode_source(data.path, data.split, data, tokenizer, template, log)
    n_rows = len(main.encoded.length)
    if data.validation_path:
        val = encode_source(data.validation_path, "validation", data, tokenizer, template, log)
        train_rows = list(range(n_rows))
        random.Random(data.seed).shuffle(train_rows)
        val_rows: list[int] = list(range(len(val.encoded.length)))
    else:
        val = main
        train_rows, val_rows = split_indices(n_rows, data.val_size, data.seed)
    if data.max_rows is not None:
        train_rows = train_rows[: data.max_rows]
    return Prepared(
        train=main.encoded.select(train_rows),
        validation=val.encoded.select(val_rows),
        train_stats=main.encoded.stats(train_rows),
        validation_stats=val.encoded.stats(val_rows),
        template=template,
        format=main.format,
        chat_template=chat_template_for(data, tokenizer) if main.format in CHAT_FORMATS else None,
        audits=(main.audit, val.audit) if data.validation_path else (main.audit,),
    )
