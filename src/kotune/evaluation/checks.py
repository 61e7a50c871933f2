"""Generation checks: greedy replies to held-out prompts through kotune's own inference path (the run's template,
its stop ids), each scored by ``kotune.evaluation.metrics``."""

from __future__ import annotations

from dataclasses import asdict

from kotune.evaluation.metrics import score_reply, summarize
from kotune.inference.generate import Sampling

CHECK_SAMPLING = Sampling(temperature=0.0, max_new_tokens=256)
"""Greedy: a check must give the same replies every time it runs on the same model."""


def generate_replies(model, tokenizer, prompts: list[str], stops: list[int], sampling: Sampling, batch_size: int = 8):
    """(text, stopped, tokens) per prompt, batch by batch."""
    import sys

    from tqdm.auto import tqdm

    from kotune.inference.generate import completion_text, encode_prompt, generate, pad_id

    out = []
    with tqdm(total=len(prompts), desc="generate", unit="reply", file=sys.stderr) as bar:
        for start in range(0, len(prompts), batch_size):
            ids = [encode_prompt(tokenizer, text) for text in prompts[start : start + batch_size]]
            for result in generate(model, ids, pad_id(tokenizer), stops, sampling):
                out.append((completion_text(tokenizer, result.ids), result.stopped, len(result.ids)))
            bar.update(len(ids))
    return out


def generation_checks(model, tokenizer, items: list[dict], stops: list[int], sampling: Sampling = CHECK_SAMPLING):
    """``items``: dicts with ``row``, ``prompt`` (formatted), ``user`` (the user's text), ``reference`` (or None).

    Returns (summary, per-reply records with the reply text).
    """
    replies = generate_replies(model, tokenizer, [item["prompt"] for item in items], stops, sampling)
    scores, records = [], []
    for item, (text, stopped, tokens) in zip(items, replies, strict=True):
        score = score_reply(text, stopped, tokens, item["user"], item["reference"])
        scores.append(score)
        records.append({"row": item["row"], "reply": text, **asdict(score)})
    return summarize(scores), records


def check_items(heldout, folder, tokenizer, limit: int | None = None) -> list[dict]:
    """The generation checks' inputs for held-out rows, prompts formatted as the run formatted training rows."""
    from kotune.evaluation.heldout import reference, user_text
    from kotune.inference.generate import row_prompt

    rows = heldout.rows[:limit] if limit else heldout.rows
    return [
        {
            "row": row["_row"],
            "prompt": row_prompt(row, heldout.fmt, folder, tokenizer, heldout.source),
            "user": user_text(row, heldout.fmt),
            "reference": reference(row, heldout.fmt),
        }
        for row in rows
    ]


def prompt_and_reference(example) -> tuple[list[int], list[int]]:
    """A training example cut where its first trained token starts: the prompt ids exactly as trained, and the
    answer's ids up to the end of that trained stretch (its closing EOS / end-of-turn included)."""
    from kotune.data.examples import IGNORE

    start = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    end = next((i for i in range(start, len(example.labels)) if example.labels[i] == IGNORE), len(example.labels))
    return list(example.input_ids[:start]), list(example.input_ids[start:end])


def training_checks(model, tokenizer, examples, n: int, sampling: Sampling = CHECK_SAMPLING) -> dict:
    """``train.eval_generate``: the generation checks on the first ``n`` validation examples, as metrics.jsonl
    fields (``gen_stop_rate`` ...). The prompts are the examples' own ids, so nothing is formatted twice."""
    from kotune.data.conversations import stop_ids
    from kotune.inference.generate import completion_text, generate, pad_id

    pairs = [prompt_and_reference(example) for example in list(examples)[:n]]
    stops = stop_ids(tokenizer, getattr(model, "generation_config", None))
    was_training = model.training
    model.eval()
    try:
        results = generate(model, [prompt for prompt, _ in pairs], pad_id(tokenizer), stops, sampling)
    finally:
        model.train(was_training)
    scores = []
    for (_, answer), result in zip(pairs, results, strict=True):
        reference = completion_text(tokenizer, [t for t in answer if t not in stops])
        scores.append(
            score_reply(completion_text(tokenizer, result.ids), result.stopped, len(result.ids), "", reference)
        )
    summary = summarize(scores)
    keys = ("stop_rate", "loop_rate", "repeated_ngrams", "reply_tokens", "chrf")
    return {f"gen_{key}": summary[key] for key in keys}
