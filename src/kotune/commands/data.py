"""``kotune data preview CONFIG``: the tokenized rows exactly as training sees them.
``kotune data audit CONFIG``: what would go wrong in training, over the whole dataset (exit 1 on a fatal problem).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from kotune.commands.train import add_config_arguments
from kotune.config_load import load_config
from kotune.data.audit import SAMPLED, parts_line
from kotune.data.examples import IGNORE, Example
from kotune.data.mixture import source_names


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect the data as training sees it")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    preview = data_sub.add_parser("preview", help="tokenized rows with trained and masked tokens marked")
    add_config_arguments(preview)
    preview.add_argument("--limit", type=int, default=5, help="rows to show (default 5)")
    preview.add_argument("--json", action="store_true", help='one JSON line per row: {"row", "input_ids", "labels"}')
    preview.add_argument("--split", choices=("train", "validation"), default="train")
    preview.set_defaults(run=run_preview)
    audit = data_sub.add_parser("audit", help="check the whole dataset for problems that would spoil training")
    add_config_arguments(audit)
    audit.add_argument("--json", action="store_true", help="the reports as one JSON object")
    audit.set_defaults(run=run_audit)


def load_prepared(cfg) -> tuple[str, object, Sequence[Example], Sequence[Example], tuple]:
    """The model path, its tokenizer, the train and validation examples and the audits of a config's data (a
    preference run's pairs as their responses after their prompts; a GRPO run's prompts)."""
    from kotune.model.assets import resolve_model
    from kotune.model.load import load_tokenizer

    model_path = resolve_model(cfg.model.path)
    tokenizer = load_tokenizer(model_path, cfg.model)
    if cfg.train.objective == "grpo":
        from kotune.data.prompts import prepare_prompts

        prompts = prepare_prompts(cfg, tokenizer)
        return model_path, tokenizer, prompts.examples("train"), prompts.examples("validation"), prompts.audits
    if cfg.train.objective != "sft":
        from kotune.data.prepare_pairs import prepare_pairs

        pairs = prepare_pairs(cfg, tokenizer)
        return model_path, tokenizer, pairs.examples("train"), pairs.examples("validation"), pairs.audits
    from kotune.data.prepare import prepare

    data = prepare(cfg.data, tokenizer)
    return model_path, tokenizer, data.train, data.validation, data.audits


def load_examples(cfg, split: str) -> tuple[list[Example], object]:
    _, tokenizer, train, validation, _ = load_prepared(cfg)
    return (train if split == "train" else validation), tokenizer


def token_pieces(tokenizer, example: Example, kinds: list[str] | None = None) -> list[tuple[str, bool]]:
    """(text, trained) per token, except that consecutive tokens of the same kind are joined until they decode to
    whole characters: byte-level tokenizers split a Hangul syllable over tokens that alone decode to U+FFFD.
    With ``kinds`` (a conversation's part per token), pieces are ``(text, (trained, kind))``."""
    pieces: list[tuple[str, object]] = []
    pending: list[int] = []
    styles: list = [label != IGNORE for label in example.labels]
    if kinds is not None:
        styles = list(zip(styles, kinds, strict=False))
    for i, token in enumerate(example.input_ids):
        pending.append(token)
        text = tokenizer.decode(pending)
        if text.endswith("\ufffd") and i + 1 < len(styles) and styles[i + 1] == styles[i]:
            continue
        pieces.append((text, styles[i]))
        pending = []
    return pieces


PART_STYLES = {
    "reasoning": ("\x1b[36m", "⟪", "⟫"),
    "empty_think": ("\x1b[35m", "⟪", "⟫"),
    "tool_calls": ("\x1b[33m", "⟦", "⟧"),
}
"""Trained conversation parts other than content: colour, and the marks that stand for it without colour."""

PREVIEW_LEGEND = {
    True: "masked = dim, trained = green; reasoning cyan, tool calls yellow, an inserted empty think block magenta",
    False: "masked = [bracketed], trained = plain; reasoning ⟪…⟫, tool calls ⟦…⟧",
}


def render_example(
    example: Example, tokenizer, color: bool, kinds: list[str] | None = None, source: str | None = None
) -> str:
    """Masked tokens dim (or in [brackets] without colour), trained tokens plain; with ``kinds``, trained
    reasoning and tool calls marked apart (``PART_STYLES``); a legend (``PREVIEW_LEGEND``) says which. ``source``:
    the name of the example's source, shown when the data has several."""
    parts = []
    for text, style in _joined(token_pieces(tokenizer, example, kinds)):
        trained, kind = style if isinstance(style, tuple) else (style, None)
        if not trained:
            parts.append(f"\x1b[2m{text}\x1b[0m" if color else f"[{text}]")
            continue
        code, opening, closing = PART_STYLES.get(kind, ("\x1b[1;32m", "", ""))
        parts.append(f"{code}{text}\x1b[0m" if color else f"{opening}{text}{closing}")
    trained = example.trained_tokens
    where = f" of {source}" if source else ""
    head = f"── row {example.row}{where}: {len(example.input_ids)} tokens, {trained} trained"
    return f"{head}\n{''.join(parts)}\n"


def _joined(pieces: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """Neighbouring pieces of one style as one (a mark per run, not per token)."""
    out: list[tuple[str, object]] = []
    for text, style in pieces:
        if out and out[-1][1] == style:
            out[-1] = (out[-1][0] + text, style)
        else:
            out.append((text, style))
    return out


def run_preview(args) -> int:
    cfg = load_config(args.config, args.overrides)
    examples, tokenizer = load_examples(cfg, args.split)
    shown = examples[: args.limit]
    names = source_names(cfg.data) if cfg.train.objective == "sft" else []
    if args.json:
        for e in shown:
            source = {"source": names[e.source]} if len(names) > 1 else {}
            print(json.dumps({"row": e.row, **source, "input_ids": e.input_ids, "labels": e.labels}))
        return 0
    color = sys.stdout.isatty()
    kinds = _conversation_kinds(cfg, tokenizer, shown)
    print(f"kotune data preview: {len(examples)} rows ({args.split}); {PREVIEW_LEGEND[color]}\n")
    for e in shown:
        source = names[e.source] if len(names) > 1 else None
        print(render_example(e, tokenizer, color, kinds.get((e.source, e.row)), source))
    return 0


def _conversation_kinds(cfg, tokenizer, examples: Sequence[Example]) -> dict[tuple[int, int], list[str]]:
    """Per shown conversation row, by ``(source, row)``, the part of each of its tokens (empty for other formats
    and preference runs)."""
    if cfg.train.objective != "sft":
        return {}
    from kotune.data.prepare import token_kinds_of_rows

    out = {}
    for source in sorted({e.source for e in examples}):
        mine = [e for e in examples if e.source == source]
        kinds = token_kinds_of_rows(cfg.data, tokenizer, [e.row for e in mine], source)
        # A row's kinds hold every token; the example stops at the cutoff.
        out |= {(source, e.row): kinds[e.row][: len(e.input_ids)] for e in mine if e.row in kinds}
    return out


def histogram_lines(report, width: int = 40) -> list[str]:
    """The token-length histogram as text bars, bins past the cutoff marked."""
    peak = max((count for _, _, count in report.histogram), default=0) or 1
    lines = []
    for low, high, count in report.histogram:
        bar = "█" * max(1 if count else 0, round(width * count / peak))
        cut = "  > cutoff" if high > report.cutoff_len else ""
        lines.append(f"    {low:>6}–{high:<6} {bar} {count}{cut}")
    return lines


def format_report(report) -> str:
    """The full text report of ``kotune data audit``."""
    s = report.lengths
    lines = [
        f"kotune data audit: {report.source} ({report.format}): {report.rows} rows, {report.kept} trainable",
        f"  tokens per row: min {s['min']} · median {s['median']} · p95 {s['p95']} · max {s['max']} "
        f"(cutoff_len {report.cutoff_len})",
        *histogram_lines(report),
    ]
    trained = f"{report.trained_tokens:,} of {report.tokens:,} ({100 * report.trained_share:.1f}%)"
    lines.append(f"  trained tokens: {SAMPLED if report.format == 'prompts' else trained}")
    if report.trained_parts:
        lines.append(f"  trained tokens by part: {parts_line(report)}")
    order = {"fatal": 0, "warning": 1, "info": 2}
    for finding in sorted(report.findings, key=lambda f: order[f.level]):
        lines.append(f"  {finding.level.upper() if finding.level == 'fatal' else finding.level}: {finding.message}")
    return "\n".join(lines)


def run_audit(args) -> int:
    from kotune.model.embeddings import add_model_checks

    cfg = load_config(args.config, args.overrides)
    model_path, tokenizer, _, _, audits = load_prepared(cfg)
    add_model_checks(audits, model_path, tokenizer)
    fatal = sum(len(r.fatal()) for r in audits)
    if args.json:
        print(json.dumps({"fatal": fatal, "reports": [r.to_dict() for r in audits]}, ensure_ascii=False))
    else:
        print("\n\n".join(format_report(r) for r in audits))
        print(f"\n{fatal} fatal problem(s)" + ("; training would stop here" if fatal else ""))
    return 1 if fatal else 0
