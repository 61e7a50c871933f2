"""The GRPO demo's data (``data/ko-grpo-demo*.jsonl``): written by ``scripts/make_grpo_demo.py`` (running it again
gives the same bytes), 60 training and 20 held-out problems that do not overlap, each answer an integer that the
``answer`` reward accepts in ``\\boxed{}`` and refuses when off by one; the demo config loads. The generated warm-up
and GRPO sets (``scripts/make_grpo_demo_data.py``): the same bytes again, no problem of the hand-checked files, and
warm-up replies that end in ``\\boxed{}`` holding the number their computation gives."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

from kotune.config_load import load_config
from kotune.rl.rewards import answer_reward

ROOT = Path(__file__).resolve().parents[2]
FILES = ("ko-grpo-demo.jsonl", "ko-grpo-demo-heldout.jsonl")
GENERATED = ("ko-grpo-warmup.jsonl", "ko-grpo-train.jsonl")


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_script_writes_the_shipped_files(tmp_path):
    script("make_grpo_demo").main(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / name).read_bytes(), name


def test_the_generator_writes_the_shipped_warmup_and_prompt_sets(tmp_path):
    script("make_grpo_demo_data").main(tmp_path, ROOT / "data")
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / name).read_bytes(), name


def test_generated_problems_are_new_and_the_warmup_replies_score():
    warmup, train = rows(GENERATED[0]), rows(GENERATED[1])
    hand_checked = {r["messages"][0]["content"] for name in FILES for r in rows(name)}
    questions = [r["messages"][0]["content"] for r in warmup + train]
    assert len(set(questions)) == len(questions) == 1400
    assert not hand_checked & set(questions)  # the held-out 20 stay unseen by both stages
    for row in warmup:
        reply = row["messages"][1]["content"]
        answer = reply.rpartition("\\boxed{")[2].rstrip("}")
        assert row["messages"][1]["role"] == "assistant" and reply.endswith(f"\n\\boxed{{{answer}}}")
        assert f"= {answer}" in reply  # the sentence's computation ends in the boxed number
    for row in train:
        assert list(row) == ["messages", "answer"] and int(row["answer"]) >= 0
        assert answer_reward(f"\\boxed{{{row['answer']}}}", row) == 1.0


def test_problems_are_verifiable_and_held_out_ones_are_new():
    train, held_out = rows(FILES[0]), rows(FILES[1])
    assert (len(train), len(held_out)) == (60, 20)
    questions = [r["messages"][0]["content"] for r in train + held_out]
    assert len(set(questions)) == 80
    for row in train + held_out:
        value = int(row["answer"])
        assert value >= 0 and "\\boxed{}" in row["messages"][0]["content"]
        assert answer_reward(f"풀이...\n\\boxed{{{value}}}", row) == 1.0
        assert answer_reward(f"\\boxed{{{value + 1}}}", row) == 0.0


def test_the_demo_config_loads_as_a_grpo_run():
    cfg = load_config(ROOT / "examples" / "ko-grpo-demo.yaml")
    assert cfg.train.objective == "grpo" and cfg.grpo.rewards == {"answer": 1.0}
    assert cfg.data.validation_path == "data/ko-grpo-demo-heldout.jsonl"
    assert cfg.data.path == "data/ko-grpo-train.jsonl"


def test_the_grpo_demo_starts_from_the_warmup_run_with_its_lora_settings():
    warmup = load_config(ROOT / "examples" / "ko-grpo-warmup.yaml")
    demo = load_config(ROOT / "examples" / "ko-grpo-demo.yaml")
    assert warmup.train.objective == "sft" and warmup.data.path == "data/ko-grpo-warmup.jsonl"
    assert demo.model.adapter == warmup.train.output_dir and demo.model.path == warmup.model.path
    assert replace(demo.lora, dropout=warmup.lora.dropout) == warmup.lora  # the weights' shapes: the same
