"""The Data page: a config's rows as training tokenizes them, trained and masked tokens apart, and its audit.

The same code as ``kotune data preview`` (``commands/data.py``): the same examples, the same pieces, so what the page
colours is what ``kotune data preview --json`` labels."""

from __future__ import annotations

from itertools import groupby

from kotune.commands.data import load_prepared, token_pieces
from kotune.config_load import load_config
from kotune.data.examples import IGNORE
from kotune.security import redact


def spans(tokenizer, example) -> list[dict]:
    """The row as runs of trained or masked tokens: ``{text, trained, tokens}``. Pieces never cross a run (a run
    changes style), and a Hangul syllable split over tokens is joined whole (``token_pieces``)."""
    runs = [(trained, len(list(group))) for trained, group in groupby(label != IGNORE for label in example.labels)]
    pieces = token_pieces(tokenizer, example)
    out, at = [], 0
    for trained, count in runs:
        text = []
        while at < len(pieces) and pieces[at][1] == trained and len(text) < count:
            text.append(pieces[at][0])
            at += 1
        out.append({"text": "".join(text), "trained": trained, "tokens": count})
    return out


def preview(config_path, split: str = "train", limit: int = 5) -> dict:
    """Rows of the config's data (``limit`` of ``split``) as spans, and the audit's findings."""
    cfg = load_config(config_path)
    _, tokenizer, train, validation, audits = load_prepared(cfg)
    examples = train if split == "train" else validation
    rows = [
        {"row": e.row, "tokens": len(e.input_ids), "trained": e.trained_tokens, "spans": spans(tokenizer, e)}
        for e in examples[:limit]
    ]
    findings = [
        {"level": f.level, "message": redact(f.message), "source": report.source}
        for report in audits
        for f in report.findings
    ]
    return {"rows": rows, "count": len(examples), "findings": findings}
