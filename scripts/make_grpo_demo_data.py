"""Write the GRPO demo's generated sets: ``data/ko-grpo-warmup.jsonl`` (SFT warm-up on the answer format) and
``data/ko-grpo-train.jsonl`` (GRPO prompts).

The demo's base (SmolLM2-135M-Instruct) solves none of the hand-written held-out problems and samples no correct
reply, so GRPO alone has nothing to reinforce. The usual recipe (DeepSeek-R1's cold start, TRL's and unsloth's GRPO
tutorials) first teaches the answer format with a short SFT, then runs GRPO: ``examples/ko-grpo-warmup.yaml``, then
``examples/ko-grpo-demo.yaml``.

- ``ko-grpo-warmup.jsonl``: ``messages`` rows, the user turn as in ``ko-grpo-demo.jsonl`` and an assistant reply
  that states the computation in one Korean sentence and ends with ``\\boxed{N}`` on its own line.
- ``ko-grpo-train.jsonl``: prompt rows in ``ko-grpo-demo.jsonl``'s format (one user turn and ``answer``).

The problems are the templates of ``scripts/make_grpo_demo.py`` (which wrote the 60 + 20 hand-checked rows) plus a
few more in their style, by the kotune authors: CC0 1.0, like the rest of ``data/``. The numbers are drawn with a
fixed seed, so running this again writes the same files. A problem whose text is one of ``ko-grpo-demo.jsonl`` or
``ko-grpo-demo-heldout.jsonl`` is never written, and no problem is in both generated files, so the held-out 20
measure problems neither stage trained on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
INSTRUCTION = "다음 문제를 풀고, 마지막 줄에 정답을 \\boxed{} 안에 숫자로만 쓰세요."
WARMUP_ROWS = 800
"""SFT rows: enough for the format and one-step arithmetic at this size, while the file stays ~350 KB."""
TRAIN_ROWS = 600
"""GRPO prompts: 50 steps of 8 prompts use 400 of them once."""


@dataclass(frozen=True)
class Problem:
    text: str
    """The question, with ``{a}``, ``{b}``, ``{c}``."""
    answer: Callable[[int, int, int], int]
    """The answer from ``(a, b, c)``."""
    working: str
    """The reply's one-sentence computation, with ``{a}``, ``{b}``, ``{c}`` and ``{n}`` (the answer)."""
    a: tuple[int, int] | None
    """Range of ``a``; None: ``a`` is ``b`` times 2..9 (a division that comes out even)."""
    b: tuple[int, int]
    """Range of ``b``."""
    c: tuple[int, int] = (1, 20)
    """Range of ``c``."""


PROBLEMS = [
    # The templates of scripts/make_grpo_demo.py, ranges unchanged: the held-out rows' distribution.
    Problem(
        "사과가 {a}개 있었는데 {b}개를 더 샀습니다. 사과는 모두 몇 개인가요?",
        lambda a, b, c: a + b,
        "있던 {a}개에 {b}개를 더하면 {a} + {b} = {n}개입니다.",
        (3, 40),
        (2, 30),
    ),
    Problem(
        "민수는 구슬 {a}개를 가지고 있다가 친구에게 {b}개를 주었습니다. 남은 구슬은 몇 개인가요?",
        lambda a, b, c: a - b,
        "{a}개에서 {b}개를 주었으므로 {a} - {b} = {n}개가 남습니다.",
        (20, 60),
        (1, 19),
    ),
    Problem(
        "한 상자에 연필이 {a}자루씩 들어 있습니다. {b}상자에는 연필이 모두 몇 자루인가요?",
        lambda a, b, c: a * b,
        "한 상자에 {a}자루씩 {b}상자이므로 {a} × {b} = {n}자루입니다.",
        (2, 12),
        (2, 9),
    ),
    Problem(
        "사탕 {a}개를 {b}명이 똑같이 나누어 가지면 한 사람이 몇 개씩 가지나요?",
        lambda a, b, c: a // b,
        "{a}개를 {b}명이 똑같이 나누므로 {a} ÷ {b} = {n}개씩입니다.",
        None,
        (2, 9),
    ),
    Problem(
        "버스에 {a}명이 타고 있었습니다. 정류장에서 {b}명이 내리고 {c}명이 탔습니다. 지금 버스에는 몇 명이 있나요?",
        lambda a, b, c: a - b + c,
        "{a}명에서 {b}명이 내리고 {c}명이 탔으므로 {a} - {b} + {c} = {n}명입니다.",
        (15, 40),
        (1, 14),
    ),
    Problem(
        "공책 한 권은 {a}00원입니다. 공책 {b}권을 사려면 얼마가 필요한가요? (원 단위 숫자만)",
        lambda a, b, c: a * 100 * b,
        "한 권에 {a}00원씩 {b}권이므로 {a}00 × {b} = {n}원입니다.",
        (5, 15),
        (2, 6),
    ),
    Problem(
        "지수는 하루에 책을 {a}쪽씩 읽습니다. {b}일 동안 읽으면 모두 몇 쪽을 읽나요?",
        lambda a, b, c: a * b,
        "하루에 {a}쪽씩 {b}일이므로 {a} × {b} = {n}쪽입니다.",
        (5, 25),
        (2, 7),
    ),
    Problem(
        "교실에 의자가 {a}줄 있고 한 줄에 {b}개씩 놓여 있습니다. 의자는 모두 몇 개인가요?",
        lambda a, b, c: a * b,
        "{a}줄에 {b}개씩이므로 {a} × {b} = {n}개입니다.",
        (3, 9),
        (4, 9),
    ),
    Problem(
        "귤 {a}개 중에서 {b}개가 상했습니다. 상하지 않은 귤은 몇 개인가요?",
        lambda a, b, c: a - b,
        "{a}개에서 상한 {b}개를 빼면 {a} - {b} = {n}개입니다.",
        (12, 50),
        (1, 11),
    ),
    Problem(
        "닭은 다리가 2개, 강아지는 다리가 4개입니다. 닭 {a}마리와 강아지 {b}마리의 다리는 모두 몇 개인가요?",
        lambda a, b, c: 2 * a + 4 * b,
        "닭의 다리는 2 × {a}, 강아지의 다리는 4 × {b}이므로 2 × {a} + 4 × {b} = {n}개입니다.",
        (1, 9),
        (1, 9),
    ),
    Problem(
        "어떤 수에 {b}를 더하면 {a}가 됩니다. 어떤 수는 얼마인가요?",
        lambda a, b, c: a - b,
        "어떤 수는 {a}에서 {b}를 뺀 수이므로 {a} - {b} = {n}입니다.",
        (20, 80),
        (2, 19),
    ),
    Problem(
        "한 변이 {a}cm인 정사각형의 둘레는 몇 cm인가요?",
        lambda a, b, c: 4 * a,
        "정사각형은 네 변의 길이가 같으므로 {a} × 4 = {n}cm입니다.",
        (2, 25),
        (1, 2),
    ),
    Problem(
        "가로 {a}m, 세로 {b}m인 직사각형 밭의 넓이는 몇 제곱미터인가요?",
        lambda a, b, c: a * b,
        "넓이는 가로 × 세로이므로 {a} × {b} = {n}제곱미터입니다.",
        (3, 15),
        (2, 12),
    ),
    Problem(
        "영희는 {a}살이고 오빠는 영희보다 {b}살 많습니다. 두 사람의 나이를 더하면 몇 살인가요?",
        lambda a, b, c: a + a + b,
        "오빠는 {a} + {b}살이므로 두 사람의 나이는 {a} + {a} + {b} = {n}살입니다.",
        (5, 15),
        (1, 6),
    ),
    Problem(
        "도서관에 책이 {a}권 있었습니다. {b}권을 빌려 가고 {c}권이 반납되었습니다. 도서관에 있는 책은 몇 권인가요?",
        lambda a, b, c: a - b + c,
        "{a}권에서 {b}권을 빌려 가고 {c}권이 돌아왔으므로 {a} - {b} + {c} = {n}권입니다.",
        (50, 120),
        (5, 30),
    ),
    # More in the same style, so the warm-up teaches the operations rather than fifteen sentences.
    Problem(
        "바구니에 딸기가 {a}개 있습니다. 엄마가 딸기 {b}개를 더 넣었습니다. 딸기는 모두 몇 개인가요?",
        lambda a, b, c: a + b,
        "{a}개에 {b}개를 더하면 {a} + {b} = {n}개입니다.",
        (5, 60),
        (2, 30),
    ),
    Problem(
        "주차장에 자동차가 {a}대 있었는데 {b}대가 나갔습니다. 남은 자동차는 몇 대인가요?",
        lambda a, b, c: a - b,
        "{a}대에서 {b}대가 나갔으므로 {a} - {b} = {n}대입니다.",
        (20, 80),
        (1, 19),
    ),
    Problem(
        "한 봉지에 과자가 {a}개씩 들어 있습니다. {b}봉지에 든 과자는 모두 몇 개인가요?",
        lambda a, b, c: a * b,
        "한 봉지에 {a}개씩 {b}봉지이므로 {a} × {b} = {n}개입니다.",
        (3, 15),
        (2, 9),
    ),
    Problem(
        "색종이 {a}장을 {b}명에게 똑같이 나누어 주면 한 명이 몇 장씩 받나요?",
        lambda a, b, c: a // b,
        "{a}장을 {b}명에게 똑같이 나누므로 {a} ÷ {b} = {n}장씩입니다.",
        None,
        (2, 9),
    ),
    Problem(
        "연못에 오리가 {a}마리 있었습니다. {b}마리가 날아가고 {c}마리가 새로 왔습니다. "
        "연못에 있는 오리는 몇 마리인가요?",
        lambda a, b, c: a - b + c,
        "{a}마리에서 {b}마리가 날아가고 {c}마리가 왔으므로 {a} - {b} + {c} = {n}마리입니다.",
        (15, 50),
        (1, 14),
    ),
    Problem(
        "우유 한 개는 {a}00원입니다. 우유 {b}개와 {c}00원짜리 빵 한 개를 사면 모두 얼마인가요? (원 단위 숫자만)",
        lambda a, b, c: a * 100 * b + c * 100,
        "우유는 {a}00 × {b}원, 빵은 {c}00원이므로 {a}00 × {b} + {c}00 = {n}원입니다.",
        (5, 15),
        (2, 5),
        (5, 20),
    ),
    Problem(
        "준호는 동화책 {a}쪽 가운데 어제 {b}쪽, 오늘 {c}쪽을 읽었습니다. 남은 쪽은 몇 쪽인가요?",
        lambda a, b, c: a - b - c,
        "{a}쪽에서 {b}쪽과 {c}쪽을 빼면 {a} - {b} - {c} = {n}쪽입니다.",
        (60, 150),
        (5, 25),
        (5, 25),
    ),
]


def draw(rng: random.Random, problem: Problem) -> tuple[str, int, str]:
    """(question, answer, the reply's computation sentence) of ``problem`` with numbers drawn from ``rng``."""
    b = rng.randint(*problem.b)
    c = rng.randint(*problem.c)
    a = b * rng.randint(2, 9) if problem.a is None else rng.randint(*problem.a)
    n = problem.answer(a, b, c)
    return problem.text.format(a=a, b=b, c=c), n, problem.working.format(a=a, b=b, c=c, n=n)


def user_turn(question: str) -> dict:
    return {"role": "user", "content": f"{INSTRUCTION}\n\n{question}"}


def existing_prompts(folder: Path) -> set[str]:
    """The user turns of the hand-checked 60 + 20 rows: never written again."""
    seen = set()
    for name in ("ko-grpo-demo.jsonl", "ko-grpo-demo-heldout.jsonl"):
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            seen.add(json.loads(line)["messages"][0]["content"])
    return seen


def generate(rng: random.Random, count: int, seen: set[str]) -> list[tuple[str, int, str]]:
    """``count`` problems whose user turn is not in ``seen`` (which takes them in), templates in turn so each has
    its share; a template whose ranges run out of new problems is passed over."""
    found, k, misses = [], 0, 0
    while len(found) < count:
        question, n, working = draw(rng, PROBLEMS[k % len(PROBLEMS)])
        k += 1
        prompt = user_turn(question)["content"]
        if prompt in seen or n < 0:
            misses += 1
            if misses > 100 * count:  # the ranges hold fewer problems than asked for
                raise RuntimeError(f"only {len(found)} new problems of {count} found")
            continue
        seen.add(prompt)
        found.append((question, n, working))
    return found


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(folder: Path = DATA, source: Path = DATA) -> None:
    """Write both files into ``folder``, avoiding the problems of the hand-checked files in ``source``."""
    rng = random.Random(2026)
    seen = existing_prompts(source)
    warmup = [
        {"messages": [user_turn(q), {"role": "assistant", "content": f"{working}\n\\boxed{{{n}}}"}]}
        for q, n, working in generate(rng, WARMUP_ROWS, seen)
    ]
    train = [{"messages": [user_turn(q)], "answer": str(n)} for q, n, _ in generate(rng, TRAIN_ROWS, seen)]
    write(folder / "ko-grpo-warmup.jsonl", warmup)
    write(folder / "ko-grpo-train.jsonl", train)


if __name__ == "__main__":
    main()
