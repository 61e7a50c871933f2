"""From config to tokenized train / validation examples: read, map columns, split, render, encode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kotune.config import Config
from kotune.data import load_split
from kotune.encoding import EncodeStats, Example, encode_rows
from kotune.formats import (
    Rendered,
    SkipRow,
    check_columns,
    detect_format,
    render_alpaca,
    render_prompt_completion,
)
from kotune.templates import Template, load_template


@dataclass
class Prepared:
    train: list[Example]
    validation: list[Example]
    train_stats: EncodeStats
    validation_stats: EncodeStats
    template: Template
    format: str


def render_rows(
    rows: list[dict[str, Any]], fmt: str, cfg: Config, template: Template, tokenizer, stats: EncodeStats
) -> list[Rendered]:
    """Render each row to segments; rows that cannot train (e.g. a null output) are skipped and counted."""
    where = cfg.data.path
    rendered = []
    for row in rows:
        try:
            if fmt == "alpaca":
                rendered.append(render_alpaca(row, template, cfg.data.train_on_inputs, where))
            elif fmt == "prompt_completion":
                rendered.append(render_prompt_completion(row, cfg.data.train_on_inputs, where))
            else:
                from kotune.conversations import render_conversation

                rendered.append(render_conversation(row, fmt, tokenizer, cfg.data, where))
        except SkipRow as reason:
            stats.rows += 1
            stats.skip(str(reason), row["_row"])
    return rendered


def encode_split(
    rows: list[dict[str, Any]], fmt: str, cfg: Config, template: Template, tokenizer
) -> tuple[list[Example], EncodeStats]:
    stats = EncodeStats()
    rendered = render_rows(rows, fmt, cfg, template, tokenizer, stats)
    return encode_rows(tokenizer, rendered, cfg.data.cutoff_len, stats)


def prepare(cfg: Config, tokenizer) -> Prepared:
    """Tokenized examples for training and validation, with counts of what was truncated or skipped."""
    split = load_split(cfg.data)
    fmt = cfg.data.format
    if fmt == "auto":
        fmt = detect_format(split.train, cfg.data.path)
    check_columns(split.train, fmt, cfg.data.path)
    template = load_template(cfg.data.template)
    train, train_stats = encode_split(split.train, fmt, cfg, template, tokenizer)
    validation, val_stats = encode_split(split.validation, fmt, cfg, template, tokenizer)
    return Prepared(train, validation, train_stats, val_stats, template, fmt)
