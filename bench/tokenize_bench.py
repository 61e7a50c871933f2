"""Tokenization speed: kotune's ``prepare`` vs the walkthrough's ``datasets.map(generate_and_tokenize_prompt)``.

    python bench/tokenize_bench.py                 # 50,000 synthetic Korean alpaca rows, 2 rounds
    python bench/tokenize_bench.py --rows 5000 --rounds 1
    python bench/tokenize_bench.py --serial        # the tokenizer on one thread (TOKENIZERS_PARALLELISM=false)

Both sides run in this process on the same JSONL file with the real Llama-3 tokenizer loaded as ``kotune train``
loads it. Each side goes from the file to tokenized train / validation rows: the walkthrough loads it with
``datasets.load_dataset("json")``, splits, shuffles and maps (its functions as written, from tests/walkthrough.py);
kotune runs ``prepare`` (read, check, render, encode in batches, audit, split) with a fresh cache, then again
with the cache it wrote. Rounds alternate the two sides so neither always runs on a warmer tokenizer cache.
Wall time (perf_counter) and process CPU time (all threads) are both reported; rows/s uses wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--serial" in sys.argv:  # must be set before the tokenizers library starts its thread pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="bench-hf-datasets-"))

WORDS = (
    "한국 서울 부산 대한민국 역사 문화 경제 사회 과학 기술 인공지능 컴퓨터 프로그램 데이터 학습 모델 "
    "문제 해결 방법 설명 질문 답변 요약 번역 문장 단어 의미 예시 결과 이유 시간 사람 학생 선생님 학교 "
    "회사 가족 친구 음식 건강 운동 여행 날씨 계절 봄 여름 가을 겨울 바다 산 강 하늘 도시 마을 나라 세계 "
    "정부 정책 법률 시장 가격 물가 환경 에너지 기후 변화 발전 연구 실험 분석 보고서 자료 정보 통계 "
    "중요한 다양한 새로운 어려운 쉬운 빠른 느린 좋은 나쁜 많은 적은 큰 작은 오래된 최근의 가능한 "
    "설명합니다 이해합니다 생각합니다 알려줍니다 제안합니다 비교합니다 정리합니다 확인합니다 "
    "있습니다 없습니다 됩니다 합니다 필요합니다 중요합니다 가능합니다 어렵습니다"
).split()
PARTICLES = ("은", "는", "이", "가", "을", "를", "의", "에", "에서", "으로", "와", "과", "도", "만", "")
INSTRUCTIONS = (
    "다음 글을 요약해 주세요.",
    "아래 문장을 영어로 번역해 주세요.",
    "다음 질문에 답해 주세요.",
    "주어진 주제에 대해 설명해 주세요.",
    "다음 내용의 장단점을 정리해 주세요.",
)


def sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) + rng.choice(PARTICLES) for _ in range(n_words)]
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words) + 1), str(rng.randrange(1, 2025)))
    if rng.random() < 0.1:
        words.insert(rng.randrange(len(words) + 1), rng.choice(("AI", "GPU", "Python", "OECD", "K-pop")))
    return " ".join(words) + rng.choice((".", ".", ".", "?", "!"))


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Korean alpaca rows: an instruction, an input 40% of the time, an answer of 2-8 sentences."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction = rng.choice(INSTRUCTIONS) + " " + sentence(rng, rng.randint(3, 12))
        text = " ".join(sentence(rng, rng.randint(5, 15)) for _ in range(rng.randint(1, 4)))
        output = " ".join(sentence(rng, rng.randint(5, 15)) for _ in range(rng.randint(2, 8)))
        rows.append({"instruction": instruction, "input": text if rng.random() < 0.4 else "", "output": output})
    return rows


# -- the walkthrough's tokenization (seed chapter 3): tests/walkthrough.py keeps its functions as written ----------
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from walkthrough import make_generate_and_tokenize_prompt  # noqa: E402

tokenizer = None  # set in main()
cut_off_len = 4098  # max context length
val_size = 0.005  # 보다 적절한 것은, validation set을 따로 구축하기.


def walkthrough(path: Path) -> tuple[int, None]:
    """The walkthrough's data steps: load, split, shuffle, map. Returns the rows tokenized."""
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    data = load_dataset("json", data_files=str(path))
    train_val = data["train"].train_test_split(test_size=val_size, shuffle=True, seed=42)
    generate_and_tokenize_prompt = make_generate_and_tokenize_prompt(tokenizer, cut_off_len)
    train_data = train_val["train"].shuffle().map(generate_and_tokenize_prompt)
    val_data = train_val["test"].shuffle().map(generate_and_tokenize_prompt)
    return len(train_data) + len(val_data), None


# -- kotune ---------------------------------------------------------------------------------------------
def kotune_prepare(path: Path, cache_dir: Path, touch: bool = False) -> tuple[int, int]:
    """``prepare`` as ``kotune train`` calls it; with ``touch``, also build every example once (as training
    will over an epoch). Returns (rows tokenized, tokens)."""
    from kotune.config_load import load_config
    from kotune.data.prepare import prepare

    os.environ["KOTUNE_CACHE"] = str(cache_dir)
    cfg = load_config(None, [f"data.path={path}", f"data.val_size={val_size}", f"data.cutoff_len={cut_off_len}"])
    data = prepare(cfg.data, tokenizer, log=lambda message: None)
    if touch:
        for split in (data.train, data.validation):
            for example in split:
                assert example.input_ids
    tokens = int(data.train.lengths().sum() + data.validation.lengths().sum())
    return len(data.train) + len(data.validation), tokens


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    global tokenizer
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides")
    parser.add_argument("--serial", action="store_true", help="tokenizer on one thread (set before import)")
    args = parser.parse_args()

    from kotune.config import ModelConfig
    from kotune.model.assets import llama3_tokenizer_dir
    from kotune.model.load import load_tokenizer

    tokenizer = load_tokenizer(llama3_tokenizer_dir(), ModelConfig())
    work = Path(tempfile.mkdtemp(prefix="tokenize-bench-"))
    path = work / "synthetic_ko_alpaca.jsonl"
    rows = synthetic_rows(args.rows)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{args.rows} rows, {path.stat().st_size / 1e6:.1f} MB, load average {os.getloadavg()[0]:.2f}", flush=True)

    results: dict[str, list[tuple[float, float]]] = {"walkthrough": [], "kotune": [], "cached": [], "cached+touch": []}
    tokens = 0
    for round_ in range(args.rounds):
        cache = work / f"cache-{round_}"
        sides = [("walkthrough", walkthrough, (path,)), ("kotune", kotune_prepare, (path, cache))]
        for name, fn, fn_args in sides if round_ % 2 == 0 else sides[::-1]:
            (n, count), wall, cpu = timed(fn, *fn_args)
            tokens = count or tokens
            results[name].append((wall, cpu))
            print(f"round {round_} {name:<12} {n} rows  wall {wall:7.2f}s  cpu {cpu:7.2f}s", flush=True)
        for name, touch in (("cached", False), ("cached+touch", True)):
            (n, _), wall, cpu = timed(kotune_prepare, path, cache, touch)
            results[name].append((wall, cpu))
            print(f"round {round_} {name:<12} {n} rows  wall {wall:7.3f}s  cpu {cpu:7.3f}s", flush=True)

    median = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    print(f"\n{tokens} tokens; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| side | wall s (median) | rows/s | cpu s (median) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        cpu = statistics.median(c for _, c in runs)
        print(f"| {name} | {median[name]:.3f} | {args.rows / median[name]:,.0f} | {cpu:.3f} |")
    print(f"\nkotune vs walkthrough: {median['walkthrough'] / median['kotune']:.1f}x (wall)")
    print(f"cached vs first kotune run: {median['kotune'] / median['cached']:.0f}x (wall)")
    print(f"cached+touch vs first kotune run: {median['kotune'] / median['cached+touch']:.1f}x (wall)")


if __name__ == "__main__":
    main()
