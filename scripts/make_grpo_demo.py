"""Write ``data/ko-grpo-demo.jsonl`` and ``data/ko-grpo-demo-heldout.jsonl``: Korean arithmetic word problems with
verifiable integer answers, for the GRPO demo (``examples/ko-grpo-demo.yaml``).

The problem texts are the kotune authors' own (CC0 1.0, like the rest of ``data/``); the numbers are drawn with a
fixed seed, so running this again writes the same files. Each row: ``messages`` (one user turn asking for the
answer in ``\\boxed{}``) and ``answer`` (the integer, as text).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
INSTRUCTION = "다음 문제를 풀고, 마지막 줄에 정답을 \\boxed{} 안에 숫자로만 쓰세요."

PROBLEMS = [
    # (text with {a} {b} {c}, answer from (a, b, c), ranges of a, b, c)
    ("사과가 {a}개 있었는데 {b}개를 더 샀습니다. 사과는 모두 몇 개인가요?", lambda a, b, c: a + b, (3, 40), (2, 30)),
    (
        "민수는 구슬 {a}개를 가지고 있다가 친구에게 {b}개를 주었습니다. 남은 구슬은 몇 개인가요?",
        lambda a, b, c: a - b,
        (20, 60),
        (1, 19),
    ),
    (
        "한 상자에 연필이 {a}자루씩 들어 있습니다. {b}상자에는 연필이 모두 몇 자루인가요?",
        lambda a, b, c: a * b,
        (2, 12),
        (2, 9),
    ),
    ("사탕 {a}개를 {b}명이 똑같이 나누어 가지면 한 사람이 몇 개씩 가지나요?", lambda a, b, c: a // b, None, (2, 9)),
    (
        "버스에 {a}명이 타고 있었습니다. 정류장에서 {b}명이 내리고 {c}명이 탔습니다. 지금 버스에는 몇 명이 있나요?",
        lambda a, b, c: a - b + c,
        (15, 40),
        (1, 14),
    ),
    (
        "공책 한 권은 {a}00원입니다. 공책 {b}권을 사려면 얼마가 필요한가요? (원 단위 숫자만)",
        lambda a, b, c: a * 100 * b,
        (5, 15),
        (2, 6),
    ),
    (
        "지수는 하루에 책을 {a}쪽씩 읽습니다. {b}일 동안 읽으면 모두 몇 쪽을 읽나요?",
        lambda a, b, c: a * b,
        (5, 25),
        (2, 7),
    ),
    (
        "교실에 의자가 {a}줄 있고 한 줄에 {b}개씩 놓여 있습니다. 의자는 모두 몇 개인가요?",
        lambda a, b, c: a * b,
        (3, 9),
        (4, 9),
    ),
    ("귤 {a}개 중에서 {b}개가 상했습니다. 상하지 않은 귤은 몇 개인가요?", lambda a, b, c: a - b, (12, 50), (1, 11)),
    (
        "닭은 다리가 2개, 강아지는 다리가 4개입니다. 닭 {a}마리와 강아지 {b}마리의 다리는 모두 몇 개인가요?",
        lambda a, b, c: 2 * a + 4 * b,
        (1, 9),
        (1, 9),
    ),
    ("어떤 수에 {b}를 더하면 {a}가 됩니다. 어떤 수는 얼마인가요?", lambda a, b, c: a - b, (20, 80), (2, 19)),
    ("한 변이 {a}cm인 정사각형의 둘레는 몇 cm인가요?", lambda a, b, c: 4 * a, (2, 25), (1, 2)),
    ("가로 {a}m, 세로 {b}m인 직사각형 밭의 넓이는 몇 제곱미터인가요?", lambda a, b, c: a * b, (3, 15), (2, 12)),
    (
        "영희는 {a}살이고 오빠는 영희보다 {b}살 많습니다. 두 사람의 나이를 더하면 몇 살인가요?",
        lambda a, b, c: a + a + b,
        (5, 15),
        (1, 6),
    ),
    (
        "도서관에 책이 {a}권 있었습니다. {b}권을 빌려 가고 {c}권이 반납되었습니다. 도서관에 있는 책은 몇 권인가요?",
        lambda a, b, c: a - b + c,
        (50, 120),
        (5, 30),
    ),
]


def draw(rng: random.Random, k: int) -> dict:
    text, answer, a_range, b_range = PROBLEMS[k % len(PROBLEMS)]
    b = rng.randint(*b_range)
    c = rng.randint(1, 20)
    a = b * rng.randint(2, 9) if a_range is None else rng.randint(*a_range)  # division: a multiple of b
    question = text.format(a=a, b=b, c=c)
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{question}"}], "answer": str(answer(a, b, c))}


def main(folder: Path = DATA) -> None:
    rng = random.Random(32)
    rows, seen = [], set()
    while len(rows) < 80:
        row = draw(rng, len(rows))
        key = row["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(row)
    for name, part in (("ko-grpo-demo.jsonl", rows[:60]), ("ko-grpo-demo-heldout.jsonl", rows[60:])):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        (folder / name).write_text(lines, encoding="utf-8")


if __name__ == "__main__":
    main()
