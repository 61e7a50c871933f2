"""Streaming tokenization (``data.streaming``) at scale: rows/s and peak memory, by the number of rows.

    nice -n 10 python bench/stream_tokenize.py --rows 1000000            # generate, tokenize, load for training
    nice -n 10 python bench/stream_tokenize.py --rows 1000000 --folder /tmp/s --phases tokenize

Generates N synthetic Korean alpaca rows into a JSON Lines file (line by line), then runs each phase in a process of
its own so its peak RSS (``getrusage``'s ``ru_maxrss``) is that phase's alone:
- ``tokenize``: ``kotune.data.stream.tokenize_to_shards`` with the real Llama-3 tokenizer, from an empty cache entry;
  RSS is also sampled every second (``/proc/self/status``) to show whether it grows with the rows done.
- ``load``: what ``kotune train`` does before its first step with the entry cached: ``prepare`` (shards joined,
  split, mixture order), the rows' lengths for the step count (``total_steps``) and the first step's rows
  (``DataOrder``: an epoch's order); then, apart, ``packing: full``'s
  packing of the training rows (best fit within windows of ``PACK_WINDOW`` rows) and how full its sequences are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's kotune

WORDS = (
    "한국 서울 부산 역사 문화 경제 사회 과학 기술 인공지능 컴퓨터 데이터 학습 모델 문제 해결 방법 설명 질문 답변 "
    "요약 번역 문장 의미 결과 이유 시간 사람 학생 학교 회사 가족 음식 건강 여행 날씨 바다 도시 나라 정부 시장 "
    "환경 에너지 기후 변화 연구 분석 자료 정보 중요한 다양한 새로운 있습니다 됩니다 합니다 필요합니다"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` alpaca rows, written as generated (bounded memory): an instruction, an input 40% of the time, an
    answer of 2-6 sentences (about 40-200 Llama-3 tokens a row)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(rows):
            row = {
                "instruction": sentence(rng, rng.randint(4, 12)),
                "input": sentence(rng, rng.randint(5, 15)) if rng.random() < 0.4 else "",
                "output": " ".join(sentence(rng, rng.randint(5, 12)) for _ in range(rng.randint(2, 6))),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup(folder: Path):
    """(config, tokenizer) of a streamed run of ``folder/rows.jsonl``, the cache under ``folder/cache``."""
    from kotune.config import ModelConfig
    from kotune.config_load import load_config
    from kotune.model.assets import llama3_tokenizer_dir
    from kotune.model.load import load_tokenizer

    tokenizer_dir = llama3_tokenizer_dir()  # from the user's cache, before the data cache moves
    os.environ["KOTUNE_CACHE"] = str(folder / "cache")
    args = [f"data.path={folder / 'rows.jsonl'}", "data.streaming=true", "data.cutoff_len=1024", "data.val_size=0.001"]
    return load_config(None, args), load_tokenizer(tokenizer_dir, ModelConfig())


def phase_tokenize(folder: Path) -> dict:
    from kotune.data import cache
    from kotune.data.prepare import chunk_encoder, source_key
    from kotune.data.stream import tokenize_to_shards
    from kotune.data.templates import load_template

    cfg, tokenizer = setup(folder)
    d = cfg.data
    spec = str(folder / "rows.jsonl")
    samples: list[tuple[float, float]] = []
    start = time.perf_counter()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append((time.perf_counter() - start, rss_mib()))

    threading.Thread(target=sample, daemon=True).start()
    before = peak_mib()
    template = load_template(d.template)
    entry = cache.data_cache_dir() / f"{source_key(spec, d, tokenizer, template)}-stream"  # the one prepare reads
    encode = chunk_encoder(spec, d, tokenizer, template)
    manifest = tokenize_to_shards(spec, d, entry, encode, lambda _: None)
    took = time.perf_counter() - start
    done.set()
    tenths = [samples[min(len(samples) - 1, int(len(samples) * k / 10))][1] for k in range(1, 11)] if samples else []
    return {
        "rows": manifest["rows"],
        "tokens": manifest["tokens"],
        "shards": len(manifest["shards"]),
        "seconds": round(took, 1),
        "rows_per_s": round(manifest["rows"] / took),
        "peak_rss_mib": round(peak_mib()),
        "peak_rss_before_tokenizing_mib": round(before),
        "rss_at_each_tenth_mib": [round(x) for x in tenths],
        "entry_mib": round(sum(f.stat().st_size for f in entry.iterdir()) / 2**20),
    }


def phase_load(folder: Path) -> dict:
    """``prepare`` on the entry the tokenize phase wrote, then the step count: what ``kotune train`` does with the
    data before its first step (the source file's sha256 for the cache key included)."""
    from kotune.data.examples import unit_lengths
    from kotune.data.order import DataOrder, sequences, total_steps
    from kotune.data.prepare import prepare

    cfg, tokenizer = setup(folder)
    before = peak_mib()
    start = time.perf_counter()
    data = prepare(cfg.data, tokenizer, log=lambda _: None)
    prepared = time.perf_counter() - start
    lengths = unit_lengths(data.train)
    steps, _ = total_steps(cfg, lengths, 1)
    counted, counted_peak = time.perf_counter() - start, peak_mib()
    DataOrder(lengths, cfg, 0, 1, packed=False).passes(0)  # the first step's rows: an epoch's order is built
    ordered, ordered_peak = time.perf_counter() - start, peak_mib()
    full = replace(cfg, train=replace(cfg.train, packing="full"))
    packing = time.perf_counter()
    packed = sequences(lengths, full)
    packing = time.perf_counter() - packing
    return {
        "train_rows": len(data.train),
        "steps": steps,
        "prepare_seconds": round(prepared, 1),
        "to_step_count_seconds": round(counted, 1),
        "peak_rss_to_step_count_mib": round(counted_peak),
        "to_first_step_rows_seconds": round(ordered, 1),
        "peak_rss_to_first_step_rows_mib": round(ordered_peak),
        "packing_full_seconds": round(packing, 1),
        "packing_full_sequences": len(packed),
        "packing_full_fill": round(sum(lengths) / (len(packed) * cfg.data.cutoff_len), 4),
        "peak_rss_mib": round(peak_mib()),
        "peak_rss_before_mib": round(before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--folder", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--phases", default="tokenize,load")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # a child process: run this one phase, print JSON
    args = parser.parse_args()
    if args.phase:
        print(json.dumps({"tokenize": phase_tokenize, "load": phase_load}[args.phase](args.folder)))
        return
    folder = args.folder or Path(tempfile.mkdtemp(prefix="stream-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "rows.jsonl"
    start = time.perf_counter()
    if not data.is_file():
        generate(data, args.rows)
    result = {
        "machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "rows": args.rows,
        "file_mib": round(data.stat().st_size / 2**20),
        "generate_seconds": round(time.perf_counter() - start, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result), flush=True)
    for phase in args.phases.split(","):
        child = [sys.executable, __file__, "--phase", phase, "--folder", str(folder)]
        out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True).stdout
        result[phase] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps({phase: result[phase]}), flush=True)
    (folder / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
