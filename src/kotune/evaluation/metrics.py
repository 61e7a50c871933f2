"""Pure scoring of generated replies: stop, loops, length, Korean script, and against a reference exact match,
contains and chrF. Nothing here needs a model, so every counter is tested on crafted strings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

LOOP_NGRAM = 10
"""Characters in the n-gram whose repetition marks a loop (a Korean word plus its ending is ~4-6)."""
LOOP_REPEATS = 3
"""A reply loops when one such n-gram occurs this many times: twice can be a legitimate echo, three is a rut."""
STOP_WARN = 0.9
"""Below this share of replies ending with EOS / end-of-turn, the model has not learnt to stop."""


def hangul_share(text: str) -> float:
    """Share of the letters that are Hangul (syllables or jamo); 0 for a text without letters."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if is_hangul(c)) / len(letters)


def is_hangul(char: str) -> bool:
    code = ord(char)
    return 0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F


def is_korean(text: str) -> bool:
    """Mostly Hangul: a Korean reply may quote an English word or two, a reply in another language does not."""
    return hangul_share(text) >= 0.5


def char_ngrams(text: str, n: int) -> list[str]:
    """Overlapping character n-grams of ``text`` with runs of whitespace collapsed to one space."""
    text = " ".join(text.split())
    return [text[i : i + n] for i in range(len(text) - n + 1)]


def repeated_share(text: str, n: int = LOOP_NGRAM) -> float:
    """Share of the reply's character n-grams that already occurred earlier in it (0: none, near 1: a loop)."""
    grams = char_ngrams(text, n)
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def loops(text: str, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """Whether some stretch of ``n`` characters occurs ``repeats`` times in the reply."""
    counts = Counter(char_ngrams(text, n))
    return bool(counts) and max(counts.values()) >= repeats


def normalize(text: str) -> str:
    """For exact match / contains: whitespace collapsed, ends stripped, case folded (Hangul has no case)."""
    return " ".join(text.split()).casefold()


# -- chrF (Popović 2015) as sacrebleu computes it: character 1..6-grams, spaces removed, beta 2 ---------------
CHRF_ORDER = 6
CHRF_BETA = 2.0


def _char_counts(text: str, n: int) -> Counter:
    text = "".join(text.split())  # chrF ignores whitespace
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, order: int = CHRF_ORDER, beta: float = CHRF_BETA) -> float:
    """Sentence chrF in 0..100, as sacrebleu's default ``CHRF()``: character n-gram precision and recall, each
    averaged over the orders 1..6 that both strings are long enough for, then their F-beta (recall weighs beta²
    as much as precision)."""
    precision = recall = 0.0
    orders = 0
    for n in range(1, order + 1):
        hyp, ref = _char_counts(hypothesis, n), _char_counts(reference, n)
        if not hyp or not ref:
            continue
        match = sum((hyp & ref).values())
        precision += match / sum(hyp.values())
        recall += match / sum(ref.values())
        orders += 1
    if not orders or precision + recall == 0:
        return 0.0
    precision, recall = precision / orders, recall / orders
    factor = beta**2
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


@dataclass
class ReplyScore:
    """The checks of one reply."""

    stopped: bool
    tokens: int
    loops: bool
    repeated: float
    korean_prompt: bool
    korean: bool
    exact: bool | None = None
    contains: bool | None = None
    chrf: float | None = None


def score_reply(text: str, stopped: bool, tokens: int, prompt: str, reference: str | None) -> ReplyScore:
    """Every check of one reply; the reference ones only when a reference exists, and on the answers alone: a
    reply's (or reference's) reasoning, its ``<think>`` block, is not what it answers (``kotune.inference.reply``)."""
    score = ReplyScore(stopped, tokens, loops(text), repeated_share(text), is_korean(prompt), is_korean(text))
    if reference:
        text, reference = answer_text(text), answer_text(reference)
        score.exact = normalize(text) == normalize(reference)
        score.contains = normalize(reference) in normalize(text)
        score.chrf = chrf(text, reference)
    return score


def answer_text(text: str) -> str:
    """``text`` without its reasoning (unchanged when it has none)."""
    from kotune.inference.reply import parse_reply

    reply = parse_reply(text)
    return text if reply.reasoning is None else reply.answer


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(scores: list[ReplyScore]) -> dict:
    """Shares and means over the replies: what ``eval_report.json`` and ``metrics.jsonl`` hold."""
    korean = [s for s in scores if s.korean_prompt]
    scored = [s for s in scores if s.chrf is not None]
    return {
        "replies": len(scores),
        "stop_rate": _mean([float(s.stopped) for s in scores]),
        "loop_rate": _mean([float(s.loops) for s in scores]),
        "repeated_ngrams": _mean([s.repeated for s in scores]),
        "reply_tokens": _mean([float(s.tokens) for s in scores]),
        "korean_rate": _mean([float(s.korean) for s in korean]),
        "exact_match": _mean([float(s.exact) for s in scored]),
        "contains": _mean([float(s.contains) for s in scored]),
        "chrf": _mean([s.chrf for s in scored]),
    }


def stop_warning(summary: dict) -> str | None:
    """The warning to print when too few replies stopped on their own."""
    rate = summary.get("stop_rate")
    if rate is None or rate >= STOP_WARN:
        return None
    return (
        f"only {100 * rate:.0f}% of the replies ended with EOS / end-of-turn (below {100 * STOP_WARN:.0f}%): the "
        "model runs on to max_new_tokens; train longer, check that EOS is trained (`kotune data audit`)"
    )
