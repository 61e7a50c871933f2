"""Multiple choice by log-likelihood, scored as lm-evaluation-harness scores ``multiple_choice`` tasks.

Each item is a question with choices and the index of the right one. The context is ``질문: QUESTION\\n정답:``
and each choice is scored as the continuation `` CHOICE`` (lm-eval's default target delimiter, a space): the sum
of the log-probabilities of its tokens given the context. ``acc`` takes the choice with the highest sum,
``acc_norm`` divides each sum by the choice's length in characters first (long choices are not punished for
their length). Context and continuation are encoded separately and concatenated, as kotune builds training rows,
so a continuation's tokens are exactly its own (lm-eval encodes the whole text and cuts it at the context's
token count; the two agree whenever no token spans the boundary, which the tests check on the bundled set).
"""

from __future__ import annotations

import json
from pathlib import Path

from kotune.data.read import DataError, jsonl_lines
from kotune.paths import CHOICE_SET

DEFAULT_SET = CHOICE_SET
"""kotune's bundled Korean smoke set (CC0): short questions in several subjects, four choices each."""

CONTEXT = "질문: {question}\n정답:"
DELIMITER = " "


def read_items(path: str | Path) -> list[dict]:
    """Items of a JSONL file: ``question``, ``choices`` (2 or more strings), ``answer`` (index or the right choice's
    text), optional ``subject``. A bad line stops with its number and what is wrong."""
    items = []
    for number, line in enumerate(jsonl_lines(Path(path).read_text(encoding="utf-8")), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg})") from None
        items.append(check_item(item, where))
    if not items:
        raise DataError(f"{path}: no items")
    return items


def check_item(item: dict, where: str) -> dict:
    """The item with ``answer`` as an index; DataError naming the field that is missing or wrong."""
    for key in ("question", "choices", "answer"):
        if key not in item:
            raise DataError(f"{where}: missing '{key}' (an item needs question, choices, answer)")
    choices = item["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least two strings")
    answer = item["answer"]
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must be a choice's index (0-{len(choices) - 1}) or its text")
    return {**item, "answer": answer}


def continuation_logprobs(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """Sum of log P(continuation tokens | context) for each continuation, one forward pass for all of them."""
    import torch

    from kotune.data.encoding import encode_segments
    from kotune.inference.generate import encode_prompt

    context_ids = encode_prompt(tokenizer, context)
    rows = [context_ids + ids for ids in encode_segments(tokenizer, continuations)]
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for i, row in enumerate(rows):
        # the token at position p is predicted by the logits at p - 1
        positions = torch.arange(len(context_ids), len(row), device=device)
        targets = ids[i, len(context_ids) : len(row)].to(device)
        out.append(logprobs[i, positions - 1, targets].sum().item())
    return out


def score_items(model, tokenizer, items: list[dict]) -> tuple[dict, list[dict]]:
    """(summary with acc, acc_norm and per subject, per item records)."""
    import sys

    from tqdm.auto import tqdm

    records = []
    for item in tqdm(items, desc="choices", unit="item", file=sys.stderr):
        lls = continuation_logprobs(
            model, tokenizer, CONTEXT.format(question=item["question"]), [DELIMITER + c for c in item["choices"]]
        )
        normed = [ll / len(choice) for ll, choice in zip(lls, item["choices"], strict=True)]
        records.append(
            {
                "question": item["question"],
                "subject": item.get("subject", "-"),
                "logprobs": lls,
                "acc": float(argmax(lls) == item["answer"]),
                "acc_norm": float(argmax(normed) == item["answer"]),
            }
        )
    return summarize_choices(records), records


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal values, as numpy's argmax


def summarize_choices(records: list[dict]) -> dict:
    subjects: dict[str, list[dict]] = {}
    for record in records:
        subjects.setdefault(record["subject"], []).append(record)

    def means(rs: list[dict]) -> dict:
        return {"items": len(rs), **{k: sum(r[k] for r in rs) / len(rs) for k in ("acc", "acc_norm")}}

    return {**means(records), "by_subject": {name: means(rs) for name, rs in sorted(subjects.items())}}
