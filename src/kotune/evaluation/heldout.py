"""Held-out rows as training sees them: read in any supported format, rendered and encoded by the run's own
template and masks (``kotune.data.prepare``), then scored: loss and perplexity per row and overall, and the prompt,
the user's text and the reference answer each row offers to the generation checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from kotune.data.encoding import encode_table
from kotune.data.examples import IGNORE, Example
from kotune.data.formats import check_columns, detect_format, used_columns
from kotune.data.read import apply_columns, check_types, read_rows, split_indices


@dataclass
class HeldOut:
    """Rows to evaluate on, their format, and the examples (ids + exact labels) of those that have an answer."""

    rows: list[dict[str, Any]]
    fmt: str
    examples: list[Example]
    source: str


def load_heldout(folder, tokenizer, path: str | None) -> HeldOut:
    """``path``'s rows, or (no path) the validation rows the run held out: its ``validation_path`` or the
    seeded ``val_size`` split of its data, exactly the rows its eval_loss was measured on."""
    from kotune.data.prepare import render_rows
    from kotune.data.read import DataError

    cfg = folder.config
    if path is not None:
        rows, source = read_rows(path), path
    elif cfg.data.sources and not cfg.data.validation_path:
        raise DataError(
            f"{folder.path}: the run trained on a mixture (data.sources), whose held-out rows kotune eval does not "
            "rebuild yet; give held-out rows with --data (each source's held-out loss is in metrics.jsonl)"
        )
    elif cfg.data.validation_path:
        source = cfg.data.validation_path
        rows = apply_columns(read_rows(source, "validation"), cfg.data.columns, source)
    else:
        every = apply_columns(read_rows(cfg.data.path, cfg.data.split), cfg.data.columns, cfg.data.path)
        rows = [every[i] for i in sorted(split_indices(len(every), cfg.data.val_size, cfg.data.seed)[1])]
        source = f"{cfg.data.path} (validation split)"
        if not rows:
            raise DataError(f"{folder.path}: the run held out no validation rows; give held-out rows with --data")
    fmt = detect_format(rows, source, "give `kotune eval` rows of one of those formats with --data")
    check_columns(rows, fmt, source)
    check_types(rows, used_columns(fmt))
    data_cfg = replace(cfg.data, path=source)
    rendered, skipped = render_rows(rows, fmt, data_cfg, folder.template, tokenizer)
    n_rows = max(row["_row"] for row in rows) + 1
    encoded = encode_table(tokenizer, rendered, n_rows, skipped, cfg.data.cutoff_len)
    examples = list(encoded.select([row["_row"] for row in rows]))
    return HeldOut(rows, fmt, examples, source)


# -- loss and perplexity ------------------------------------------------------------------------------
def row_losses(model, examples: list[Example], pad_id: int, batch_size: int = 4) -> list[dict]:
    """Per row: summed next-token loss over its trained tokens, their count, mean loss and perplexity.

    The same positions ``kotune.training.build.loss_sum`` trains on (labels shifted by one, -100 left out), row by row.
    """
    import torch

    from kotune.data.batching import collate

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        for i, example in enumerate(chunk):
            keep = labels[i] != IGNORE
            loss = torch.nn.functional.cross_entropy(
                logits[i, :-1][keep].float(), labels[i][keep], reduction="sum"
            ).item()
            tokens = int(keep.sum())
            out.append({"row": example.row, "loss_sum": loss, "tokens": tokens, **mean_and_perplexity(loss, tokens)})
    return out


def mean_and_perplexity(loss_sum: float, tokens: int) -> dict:
    mean = loss_sum / tokens if tokens else float("nan")
    return {"loss": mean, "perplexity": math.exp(mean) if tokens else float("nan")}


def overall_loss(rows: list[dict]) -> dict:
    """Token-weighted over all rows, as training's eval_loss: long answers weigh by their tokens."""
    total, tokens = sum(r["loss_sum"] for r in rows), sum(r["tokens"] for r in rows)
    return {"rows": len(rows), "tokens": tokens, **mean_and_perplexity(total, tokens)}


# -- what the generation checks need of a row ---------------------------------------------------------
def user_text(row: dict[str, Any], fmt: str) -> str:
    """The text the user wrote (no template around it): what tells whether the prompt is Korean."""
    if fmt == "alpaca":
        return f"{row['instruction']}\n{row.get('input') or ''}"
    if fmt == "prompt_completion":
        return str(row["prompt"])
    turns = row.get("messages") or row.get("conversations") or []
    users = [t.get("content", t.get("value", "")) for t in turns if t.get("role", t.get("from")) in ("user", "human")]
    return str(users[-1]) if users else ""


def reference(row: dict[str, Any], fmt: str) -> str | None:
    """The expected answer, when the row has one: output, completion, or a final assistant turn."""
    if fmt == "alpaca":
        value = row.get("output")
    elif fmt == "prompt_completion":
        value = row.get("completion")
    else:
        turns = row.get("messages") or row.get("conversations") or []
        last = turns[-1] if turns else {}
        is_answer = last.get("role", last.get("from")) in ("assistant", "gpt")
        value = last.get("content", last.get("value")) if is_answer else None
    return str(value) if value not in (None, "") else None
