"""Case V's data: alpaca-like rows whose token lengths follow a stated, seeded distribution.

Lengths (prompt + response + EOS, in tokens of the bench tokenizer) are log-normal with median 350 and
p95 1,500 (mu = ln 350, sigma = ln(1500 / 350) / 1.645 = 0.885), clipped to [24, 4,096]; a row's response
takes a uniform 30-70% of it, half of the rows have an ``input``. The bench model's tokenizer
(``anchor_bench.py``) is a word-level one where each word ``t<id>`` is one token, so a row is written as
words and ``kotune``'s own pipeline (template, tokenization, masks) turns it into ids. The template adds
a few tokens, so measured lengths are reported from the tokenized rows, not from this plan.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

MEDIAN, P95, LONGEST, SHORTEST = 350, 1500, 4096, 24
SIGMA = math.log(P95 / MEDIAN) / 1.645
TEMPLATE_TOKENS = {False: 10, True: 18}
"""Tokens the ko-alpaca template adds (without / with an input) under the word-level bench tokenizer."""


def planned_lengths(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [min(LONGEST, max(SHORTEST, round(rnd.lognormvariate(math.log(MEDIAN), SIGMA)))) for _ in range(n)]


def _words(rnd: random.Random, n: int) -> str:
    return " ".join(f"t{rnd.randrange(10, 128000)}" for _ in range(n))


def rows(n: int, seed: int) -> list[dict]:
    """``n`` alpaca rows (instruction, input, output) with planned token lengths."""
    rnd = random.Random(seed + 1)
    out = []
    for total in planned_lengths(n, seed):
        with_input = rnd.random() < 0.5
        body = max(8, total - TEMPLATE_TOKENS[with_input] - 1)  # template words and EOS come on top
        response = max(1, round(body * rnd.uniform(0.3, 0.7)))
        prompt = max(2, body - response)
        instruction = prompt // 2 if with_input else prompt
        out.append(
            {
                "instruction": _words(rnd, max(1, instruction)),
                "input": _words(rnd, prompt - instruction) if with_input else "",
                "output": _words(rnd, response),
            }
        )
    return out


def write(path: Path, n: int = 4000, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)), encoding="utf-8")
    return path


def summary(lengths: list[int]) -> dict:
    s = sorted(lengths)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"rows": len(s), "tokens": sum(s), "median": pick(0.5), "p95": pick(0.95), "max": s[-1], "min": s[0]}
