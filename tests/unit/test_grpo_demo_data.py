"""The GRPO demo's data (``data/ko-grpo-demo*.jsonl``): written by ``scripts/make_grpo_demo.py`` (running it again
gives the same bytes), 60 training and 20 held-out problems that do not overlap, each answer an integer that the
``answer`` reward accepts in ``\\boxed{}`` and refuses when off by one; the demo config loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from kotune.config_load import load_config
from kotune.rl.rewards import answer_reward

ROOT = Path(__file__).resolve().parents[2]
FILES = ("ko-grpo-demo.jsonl", "ko-grpo-demo-heldout.jsonl")


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()]


def test_the_script_writes_the_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_grpo_demo", ROOT / "scripts" / "make_grpo_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / name).read_bytes(), name


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
