"""Rewards of online RL (``grpo.rewards``): functions of a completion's text and its prompt row, combined with
weights.

Each reward is ``fn(completion: str, row: dict) -> float``; ``row`` is the prompt row as read (its answer columns
included, ``_row`` its number in the file). Built in: ``answer``, ``format``, ``korean``, ``length``; a user's own
is named ``path/to/file.py:function``. ``RewardSet.score`` returns the weighted sum and each component, so a step
can log them all; a reward that raises or returns no finite number stops the run naming the row, the function and
the reply.
"""

from __future__ import annotations

import importlib.util
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from kotune.errors import KotuneError
from kotune.grpo_config import GrpoConfig

Reward = Callable[[str, dict], float]


class RewardError(KotuneError, ValueError):
    """A reward function that cannot be loaded, raised, or returned no number; the message names it."""


# -- answers --------------------------------------------------------------------------------------------
NUMBER = re.compile(r"[-−]?\d+(?:\.\d+)?")


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces inside it balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def final_answer(text: str) -> str:
    """What a reply gives as its final answer: the last ``\\boxed{}``, else the last ``<answer>`` block, else the
    whole text."""
    found = boxed(text)
    if found is not None:
        return found
    blocks = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    return blocks[-1] if blocks else text


def as_number(text: str) -> float | None:
    """The last number in ``text`` (full-width digits, thousands commas and the minus sign normalised), or None."""
    text = unicodedata.normalize("NFKC", text).replace("−", "-")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    found = NUMBER.findall(text)
    return float(found[-1].replace("−", "-")) if found else None


def normalise(text: str) -> str:
    """Text compared as an answer: NFKC, case folded, ``$`` and spaces dropped, a final period dropped."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("$", "")
    return re.sub(r"\s+", "", text).rstrip(".")


def answer_reward(completion: str, row: dict, column: str = "answer") -> float:
    """1 when the reply's final answer equals the row's ``column``: as numbers when the reference is one (``12``,
    ``12.0``, ``1,200`` and ``\\boxed{12}`` all match 12), else as normalised text; 0 otherwise."""
    if column not in row:
        raise KeyError(f"the row has no column {column!r} (grpo.answer_column)")
    reference, given = str(row[column]), final_answer(completion)
    want = as_number(reference) if NUMBER.fullmatch(normalise(reference).replace(",", "")) else None
    if want is not None:
        got = as_number(given)
        return float(got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))
    return float(normalise(given) == normalise(reference))


# -- form -----------------------------------------------------------------------------------------------
FORMAT = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", flags=re.DOTALL)


def format_reward(completion: str, row: dict) -> float:
    """1 when the reply has a ``<think>...</think>`` block and then an ``<answer>...</answer>`` block, else 0."""
    return float(FORMAT.search(completion) is not None)


def is_hangul(ch: str) -> bool:
    """Hangul syllables and jamo (compatibility jamo included)."""
    return "\uac00" <= ch <= "\ud7a3" or "\u1100" <= ch <= "\u11ff" or "\u3130" <= ch <= "\u318f"


def korean_reward(completion: str, row: dict) -> float:
    """The share of Hangul among the reply's letters (digits, punctuation and spaces not counted); 0 without
    letters."""
    letters = [ch for ch in completion if ch.isalpha()]
    return sum(is_hangul(ch) for ch in letters) / len(letters) if letters else 0.0


def length_reward(completion: str, row: dict, target: int = 512) -> float:
    """0 up to ``target`` characters; beyond, minus the share by which the reply is longer, down to -1."""
    return -min(1.0, max(0, len(completion) - target) / target)


# -- loading and combining ------------------------------------------------------------------------------
def load_user_reward(spec: str) -> Reward:
    """``path/to/file.py:function``, imported from the file (relative to the working directory)."""
    path, _, name = spec.rpartition(":")
    if not path or not name or not path.endswith(".py"):
        raise RewardError(
            f"grpo.rewards: {spec!r} is neither a built-in reward ({', '.join(BUILTIN)}) nor path/to/file.py:function"
        )
    file = Path(path)
    if not file.is_file():
        raise RewardError(f"grpo.rewards: {spec!r}: no file {file.resolve()}")
    module_spec = importlib.util.spec_from_file_location(f"kotune_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise RewardError(f"grpo.rewards: {file} has no function {name!r} (functions there: {', '.join(found)})")
    return fn


BUILTIN = ("answer", "format", "korean", "length")


def builtin(name: str, g: GrpoConfig) -> Reward:
    return {
        "answer": partial(answer_reward, column=g.answer_column),
        "format": format_reward,
        "korean": korean_reward,
        "length": partial(length_reward, target=g.length_target),
    }[name]


@dataclass
class RewardSet:
    """The run's rewards: (name, function, weight) each; the reward is the weighted sum."""

    parts: list[tuple[str, Reward, float]]

    @classmethod
    def from_config(cls, g: GrpoConfig) -> RewardSet:
        parts = []
        for name, weight in g.rewards.items():
            fn = builtin(name, g) if name in BUILTIN else load_user_reward(name)
            parts.append((name, fn, float(weight)))
        return cls(parts)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.parts]

    def score(self, completions: list[str], rows: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted reward of each completion, each function's unweighted values by name); ``rows[i]`` is the
        prompt row of ``completions[i]``."""
        components = {name: [call(name, fn, c, r) for c, r in zip(completions, rows, strict=True)]
                      for name, fn, _ in self.parts}  # fmt: skip
        totals = [sum(w * components[name][i] for name, _, w in self.parts) for i in range(len(completions))]
        return totals, components


def call(name: str, fn: Reward, completion: str, row: dict) -> float:
    """``fn(completion, row)`` as a float; an exception or a value that is no finite number is a RewardError
    naming the row, the function and the reply."""
    where = f"reward {name!r} on prompt row {row.get('_row', '?')}"
    reply = completion if len(completion) <= 300 else completion[:300] + "..."
    try:
        value = fn(completion, row)
    except Exception as exc:
        raise RewardError(f"{where} raised {type(exc).__name__}: {exc}; the reply was {reply!r}") from exc
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, str) or not math.isfinite(number):
        raise RewardError(f"{where} returned {value!r}, not a finite number; the reply was {reply!r}")
    return number
