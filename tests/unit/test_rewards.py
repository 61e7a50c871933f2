"""GRPO's rewards (``kotune.rl.rewards``) and its config section: hand-checkable values of each built-in, the
weighted sum with its components, a user's function loaded from a file, and errors that name the row, the function
and the reply."""

from __future__ import annotations

import pytest

from kotune.config_load import load_config
from kotune.grpo_config import GrpoConfig, GrpoConfigError
from kotune.rl.rewards import (
    RewardError,
    RewardSet,
    answer_reward,
    final_answer,
    format_reward,
    korean_reward,
    length_reward,
)

ROW = {"_row": 7, "prompt": "3 더하기 4는?", "answer": "7"}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("답은 7입니다.", 1.0),
        ("3 + 4 = 7", 1.0),
        ("7.0", 1.0),
        ("\\boxed{7} 이고 나머지 8", 1.0),  # the boxed answer wins over a later number
        ("<answer>７</answer>", 1.0),  # full-width digit
        ("7 아니고 8", 0.0),  # the last number is the answer
        ("\\boxed{8}", 0.0),
        ("모르겠어요", 0.0),
    ],
)
def test_answer_reward_normalises_numbers(reply, expected):
    assert answer_reward(reply, ROW) == expected


def test_answer_reward_thousands_text_and_columns():
    assert answer_reward("총 1,200원", {"answer": "1200"}) == 1.0
    assert answer_reward("\\boxed{-3}", {"answer": "−3"}) == 1.0
    assert answer_reward("<answer> Seoul. </answer>", {"answer": "seoul"}) == 1.0
    assert answer_reward("Busan", {"answer": "seoul"}) == 0.0
    assert answer_reward("5", {"gold": "5"}, column="gold") == 1.0
    with pytest.raises(KeyError, match="'answer'"):
        answer_reward("5", {"gold": "5"})


def test_final_answer_takes_nested_boxed_and_last_answer_block():
    assert final_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert final_answer("<answer>1</answer> <answer>2</answer>") == "2"


def test_format_korean_and_length():
    assert format_reward("<think>3+4</think> <answer>7</answer>", ROW) == 1.0
    assert format_reward("<answer>7</answer><think>3+4</think>", ROW) == 0.0  # out of order
    assert format_reward("<think>3+4 <answer>7</answer>", ROW) == 0.0  # think never closed
    assert korean_reward("답은 7", ROW) == 1.0  # digits and spaces are not letters
    assert korean_reward("답 ab", ROW) == pytest.approx(1 / 3)
    assert korean_reward("123", ROW) == 0.0
    assert length_reward("a" * 10, ROW, target=10) == 0.0
    assert length_reward("a" * 15, ROW, target=10) == pytest.approx(-0.5)
    assert length_reward("a" * 100, ROW, target=10) == -1.0


def test_weighted_sum_and_components():
    rewards = RewardSet.from_config(GrpoConfig(rewards={"answer": 1.0, "format": 0.5}))
    totals, parts = rewards.score(["<think>t</think><answer>7</answer>", "8"], [ROW, ROW])
    assert parts == {"answer": [1.0, 0.0], "format": [1.0, 0.0]}
    assert totals == [1.5, 0.0]


def test_user_reward_from_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def polite(completion, row):\n    return 1.0 if completion.endswith('요') else -1.0\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    rewards = RewardSet.from_config(GrpoConfig(rewards={"my_rewards.py:polite": 2.0}))
    totals, parts = rewards.score(["감사해요", "감사"], [ROW, ROW])
    assert totals == [2.0, -2.0] and parts == {"my_rewards.py:polite": [1.0, -1.0]}


def test_user_reward_that_cannot_load(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text("def other(c, r):\n    return 0\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError, match="has no function 'missing' .*other"):
        RewardSet.from_config(GrpoConfig(rewards={"r.py:missing": 1.0}))
    with pytest.raises(RewardError, match="no file"):
        RewardSet.from_config(GrpoConfig(rewards={"nowhere.py:f": 1.0}))
    with pytest.raises(RewardError, match="neither a built-in reward"):
        RewardSet.from_config(GrpoConfig(rewards={"anwser": 1.0}))


def test_a_reward_that_raises_names_row_function_and_reply(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text(
        "def strict(c, r):\n    return int(c)\n\ndef nan(c, r):\n    return float('nan')\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    rewards = RewardSet.from_config(GrpoConfig(rewards={"r.py:strict": 1.0}))
    with pytest.raises(RewardError, match=r"'r.py:strict' on prompt row 7 raised ValueError.*reply was '일곱'"):
        rewards.score(["7", "일곱"], [ROW, ROW])
    nan = RewardSet.from_config(GrpoConfig(rewards={"r.py:nan": 1.0}))
    with pytest.raises(RewardError, match="returned nan, not a finite number"):
        nan.score(["7"], [ROW])


def test_grpo_config_loads_and_checks_ranges():
    cfg = load_config(None, ["train.objective=grpo", "grpo.rewards={answer: 1, korean: 0.25}", "grpo.beta=0.04"])
    assert cfg.grpo.rewards == {"answer": 1.0, "korean": 0.25} and cfg.grpo.beta == 0.04
    with pytest.raises(GrpoConfigError, match="'grpo.generations' must be at least 2"):
        load_config(None, ["grpo.generations=1"])
    with pytest.raises(GrpoConfigError, match="'grpo.temperature'"):
        load_config(None, ["grpo.temperature=0"])
    with pytest.raises(GrpoConfigError, match="'grpo.iterations' must be positive, got 0"):
        load_config(None, ["grpo.iterations=0"])
    with pytest.raises(Exception, match="'train.distributed' fsdp cannot train grpo"):
        load_config(None, ["train.objective=grpo", "train.distributed=fsdp"])
    with pytest.raises(Exception, match="'grpo.rewards.answer' must be a number"):
        load_config(None, ["grpo.rewards={answer: high}"])
