"""From config to tokenized train / validation examples: read, map columns, check, render, encode, audit, split.

Each data source (``data.path``, and ``data.validation_path`` when set) is encoded whole and audited once; the
result is cached (``kotune.data.cache``), so a second run with the same inputs skips straight to the split. With
``data.streaming`` a source is tokenized chunk by chunk into the cache instead (``kotune.data.stream``), and the
checks that need every row's text at once (duplicates, contamination) are left out.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kotune import output
from kotune.config import DataConfig
from kotune.data import cache
from kotune.data.audit import INFO, WARNING, AuditReport, Finding, audit_source
from kotune.data.contamination import find_overlaps, overlap_message, references
from kotune.data.dedup import duplicate_message, find_duplicates
from kotune.data.encoding import encode_table
from kotune.data.examples import Encoded, EncodeStats, Example
from kotune.data.formats import (
    CHAT_FORMATS,
    Rendered,
    SkipRow,
    check_columns,
    check_one_format,
    detect_format,
    render_alpaca,
    render_prompt_completion,
    used_columns,
)
from kotune.data.mixture import (
    gather,
    held_out_share,
    merged_stats,
    mix,
    source_data,
    source_list,
    source_names,
)
from kotune.data.read import DataError, apply_columns, check_types, is_local, read_rows, split_indices
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
    """The audit of each source (``data.path`` or ``data.sources``), then of ``data.validation_path`` when set."""
    source_names: tuple[str, ...] = ()
    """Each example's ``source`` names one of these: the training sources, then ``data.validation_path``."""


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


def token_kinds_of_rows(data: DataConfig, tokenizer, row_ids: list[int], source: int = 0) -> dict[int, list[str]]:
    """For conversation data: the part (``kotune.data.turn_parts`` kinds) of each token of the rows ``row_ids`` of
    source ``source`` (an ``Example.source``: a training source, or after them ``data.validation_path``); other
    formats: empty."""
    sources = source_list(data)
    if source < len(sources):
        data = source_data(data, sources[source])
        spec, split = data.path, data.split
    else:
        spec, split = data.validation_path, "validation"
    rows = apply_columns(read_rows(spec, split), data.columns, spec)
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


def source_key(spec: str, data: DataConfig, tokenizer, template: Template) -> str | None:
    """The cache entry's name for this source under these settings (``kotune.data.cache.cache_key``)."""
    templates = {"prompt": f"{template.prompt_input}\x00{template.prompt_no_input}"}
    templates["chat"] = chat_template_for(data, tokenizer)
    return cache.cache_key(spec, data, tokenizer, templates)


def encode_source(spec: str, split: str, data: DataConfig, tokenizer, template: Template, log: Callable) -> Source:
    """Read, check, render, encode and audit one source, or take it from the cache."""
    if data.streaming:
        return stream_source(spec, data, tokenizer, template, source_key(spec, data, tokenizer, template), log)
    key = source_key(spec, data, tokenizer, template) if data.cache else None
    hit = cache.load(key) if key else None
    if hit is not None:
        encoded, meta = hit
        log(f"kotune: data: {spec}: reused the tokenized data cached in {cache.data_cache_dir() / key}")
        return Source(encoded, meta["format"], AuditReport.from_dict(meta["audit"]))
    start = time.perf_counter()
    rows = apply_columns(read_rows(spec, split), data.columns, spec)
    fmt = data.format if data.format != "auto" else detect_format(rows, spec)
    check_columns(rows, fmt, spec)
    check_one_format(rows, fmt, spec)
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


def chunk_encoder(spec: str, data, tokenizer, template):
    """``encode_chunk`` for ``kotune.data.stream.tokenize_to_shards``: one chunk checked, rendered and encoded as
    a whole source is (a column's type and the format are checked per chunk)."""

    def encode_chunk(rows: list[dict[str, Any]], fmt: str | None):
        fmt = fmt or (data.format if data.format != "auto" else detect_format(rows, spec))
        check_columns(rows, fmt, spec)
        check_one_format(rows, fmt, spec)
        check_types(rows, used_columns(fmt))
        rendered, skipped = render_rows(rows, fmt, data, template, tokenizer)
        return encode_table(tokenizer, rendered, len(rows), skipped, data.cutoff_len), fmt

    return encode_chunk


def stream_source(spec: str, data: DataConfig, tokenizer, template: Template, key: str | None, log) -> Source:
    """A source tokenized chunk by chunk into the cache (``kotune.data.stream``), or the entry already there."""
    from kotune.data.stream import load_shards, stream_audit, tokenize_to_shards

    if key is None:
        where = "file not found" if is_local(spec) else "a hub dataset"
        raise DataError(f"{spec}: data.streaming reads local .jsonl files ({where})")
    folder = cache.data_cache_dir() / f"{key}-stream"
    manifest = tokenize_to_shards(spec, data, folder, chunk_encoder(spec, data, tokenizer, template), log)
    encoded = load_shards(folder)
    return Source(encoded, manifest["format"], stream_audit(spec, manifest, encoded, data.cutoff_len))


def prepare(data: DataConfig, tokenizer, log: Callable[[str], None] = output.status) -> Prepared:
    """Tokenized examples for training and validation, with counts of what was truncated or skipped: each source
    encoded and split, duplicates found (``data.dedup``), the training rows mixed (``kotune.data.mixture``)."""
    sources, names = source_list(data), source_names(data)
    encoded, splits = [], []
    for s in sources:
        d = source_data(data, s)
        encoded.append(encode_source(s.path, s.split, d, tokenizer, load_template(d.template), log))
        train_rows, val_rows = split_indices(len(encoded[-1].encoded.length), held_out_share(data, s), data.seed)
        splits.append((train_rows[: d.max_rows] if d.max_rows is not None else train_rows, val_rows))
    train_stats = [src.encoded.stats(t) for src, (t, _) in zip(encoded, splits, strict=True)]
    val_stats = [src.encoded.stats(v) for src, (_, v) in zip(encoded, splits, strict=True)]
    if data.streaming:  # every row's text at once: not for sources larger than memory
        audits, dropped, texts = [src.audit for src in encoded], [set() for _ in encoded], None
    else:
        audits, dropped, texts = find_and_report_duplicates(data, tokenizer, encoded, splits, names, log)
    _count_dropped(splits, train_stats, val_stats, dropped)
    kept = [_examples(src, t, dropped[i]) for i, (src, (t, _)) in enumerate(zip(encoded, splits, strict=True))]
    for name, rows, stats in zip(names, kept, train_stats, strict=False):
        if data.sources and not len(rows):
            raise DataError(f"data source {name}: no trainable rows ({stats.summary()})")
    val_picks = [
        (i, int(e))
        for i, (src, (_, v)) in enumerate(zip(encoded, splits, strict=True))
        for e in _examples(src, v, dropped[i])
    ]
    tables = [src.encoded.examples for src in encoded]
    if data.validation_path:
        val = encode_source(data.validation_path, "validation", data, tokenizer, load_template(data.template), log)
        all_rows = list(range(len(val.encoded.length)))
        val_picks += [(len(sources), int(e)) for e in _examples(val, all_rows, set())]
        val_stats.append(val.encoded.stats(all_rows))
        audits.append(val.audit)
        tables.append(val.encoded.examples)
    formats = [src.format for src in encoded]
    validation = gather(tables, val_picks)
    if texts is not None:
        training = [set(t) - dropped[i] for i, (t, _) in enumerate(splits)]
        trained = [[(r, t) for r, t in rows if r in mine] for rows, mine in zip(texts, training, strict=True)]
        report_contamination(trained, references(data, tokenizer, validation, names), audits, names, log)
    return Prepared(
        train=gather(tables, mix(kept, sources, data.seed)),
        validation=validation,
        train_stats=merged_stats(train_stats, names[: len(sources)]),
        validation_stats=merged_stats(val_stats, names),
        template=load_template(source_data(data, sources[0]).template),
        format=formats[0],
        chat_template=chat_template_for(data, tokenizer) if set(formats) & set(CHAT_FORMATS) else None,
        audits=tuple(audits),
        source_names=tuple(names),
    )


def _count_dropped(splits, train_stats: list[EncodeStats], val_stats: list[EncodeStats], dropped) -> None:
    """Count the duplicates ``data.dedup`` leaves out as skipped rows of their source's split."""
    for i, (train_rows, val_rows) in enumerate(splits):
        for stats, rows in ((train_stats[i], train_rows), (val_stats[i], val_rows)):
            for row in (r for r in rows if r in dropped[i]):
                stats.kept -= 1
                stats.skip("duplicate of an earlier row (data.dedup)", row)


def _examples(source: Source, rows: Sequence[int], dropped: set[int]) -> np.ndarray:
    """Positions in the source's example table of ``rows`` (in that order) that were kept and are no duplicate."""
    rows = np.asarray(rows, dtype=np.int64)
    positions = source.encoded.example_index()[rows]
    keep = positions >= 0
    if dropped:
        keep &= ~np.isin(rows, np.fromiter(dropped, dtype=np.int64))
    return positions[keep]


def find_and_report_duplicates(
    data: DataConfig, tokenizer, encoded: Sequence[Source], splits, names: Sequence[str], log: Callable
) -> tuple[list[AuditReport], list[set[int]], list[list[tuple[int, str]]]]:
    """Each source's audit with its duplicates reported, per source the rows ``data.dedup`` leaves out, and the
    texts compared (per source, ``(row, text)`` of its kept training and held-out rows)."""
    texts = []
    for src, (train_rows, val_rows) in zip(encoded, splits, strict=True):
        index = src.encoded.example_index()
        rows = sorted(r for r in (*train_rows, *val_rows) if index[r] >= 0)
        ids = [src.encoded.examples[int(index[r])].input_ids for r in rows]
        texts.append(list(zip(rows, tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else [], strict=True)))
    dups = find_duplicates(texts, "exact" if data.dedup == "off" else data.dedup)
    drop = data.dedup != "off"
    audits, dropped = [], []
    for i, src in enumerate(encoded):
        mine = [d for d in dups if d.source == i]
        dropped.append({d.row for d in mine} if drop else set())
        if not mine:
            audits.append(src.audit)
            continue
        message = duplicate_message(mine, len(texts[i]), names, drop)
        finding = Finding("duplicates", INFO if drop else WARNING, message, [d.row for d in mine])
        audits.append(dataclasses.replace(src.audit, findings=[*src.audit.findings, finding]))
        log(f"kotune: data: {names[i]}: {message}")
    return audits, dropped, texts


def report_contamination(trained, refs, audits: list[AuditReport], names: Sequence[str], log: Callable) -> None:
    """Each source's training rows that hold evaluation text (``kotune.data.contamination``), added to its audit."""
    overlaps = find_overlaps(trained, refs)
    for i, rows in enumerate(trained):
        mine = [o for o in overlaps if o.source == i]
        if mine:
            message = overlap_message(mine, len(rows))
            finding = Finding("contamination", WARNING, message, sorted({o.row for o in mine}))
            audits[i] = dataclasses.replace(audits[i], findings=[*audits[i].findings, finding])
            log(f"kotune: data: {names[i]}: {message}")
