"""The generation checks' counters and chrF on crafted, hand-checked strings (no model)."""

from __future__ import annotations

import pytest

from kotune.evaluation.metrics import (
    chrf,
    hangul_share,
    is_korean,
    loops,
    repeated_share,
    score_reply,
    stop_warning,
    summarize,
)


def test_chrf_hand_checked():
    assert chrf("abc", "abc") == pytest.approx(100.0)
    assert chrf("abc", "xyz") == 0.0
    # "ab" vs "abc": unigrams P=2/2 R=2/3, bigrams P=1/1 R=1/2, no hypothesis trigram (two orders count):
    # P=1, R=7/12, F2 = 5 * 1 * 7/12 / (4 + 7/12) = 7/11
    assert chrf("ab", "abc") == pytest.approx(100 * 7 / 11)
    assert chrf("a b c", "abc") == pytest.approx(100.0)  # chrF ignores whitespace
    assert chrf("", "abc") == 0.0


def test_chrf_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    pairs = [
        ("서울은 대한민국의 수도입니다.", "대한민국의 수도는 서울입니다."),
        ("금성입니다", "금성입니다. 두꺼운 대기가 열을 가둡니다."),
        ("The cat sat on the mat", "A cat is sitting on a mat"),
    ]
    metric = sacrebleu.metrics.CHRF()
    for hyp, ref in pairs:
        assert chrf(hyp, ref) == pytest.approx(metric.sentence_score(hyp, [ref]).score, abs=1e-6)


def test_loops_and_repeated_share():
    assert loops("하하하" * 10)
    assert loops("감사합니다. " * 4)
    assert not loops("서울은 대한민국의 수도이며 가장 큰 도시입니다. 한강이 도시를 가로질러 흐릅니다.")
    assert not loops("감사합니다. " * 2)  # an echo, not a rut
    assert repeated_share("abcdefghij") == 0.0
    assert repeated_share("0123456789" * 3) == pytest.approx(11 / 21)  # 21 grams, 10 distinct
    assert repeated_share("short") == 0.0


def test_korean_script():
    assert hangul_share("한국어 text") == pytest.approx(3 / 7)
    assert is_korean("서울은 Seoul이라고 씁니다")
    assert not is_korean("Seoul is the capital")
    assert not is_korean("12345")


def test_summary_counts_stops_loops_and_references():
    replies = [
        score_reply("금성입니다.", True, 4, "가장 뜨거운 행성은?", "금성입니다."),
        score_reply("The answer is Venus", True, 5, "가장 뜨거운 행성은?", "금성"),
        score_reply("네 네 네 네 네 네 네 네 네 네 네 네 네 네", False, 30, "hello", None),
        score_reply("금성이고 뜨겁습니다", False, 6, "행성?", "금성"),
    ]
    summary = summarize(replies)
    assert summary["replies"] == 4
    assert summary["stop_rate"] == 0.5
    assert summary["loop_rate"] == 0.25
    assert summary["reply_tokens"] == pytest.approx(45 / 4)
    assert summary["korean_rate"] == pytest.approx(2 / 3)  # the English prompt is not counted
    assert summary["exact_match"] == pytest.approx(1 / 3)  # of the three replies with a reference
    assert summary["contains"] == pytest.approx(2 / 3)
    assert stop_warning(summary) is not None and "50%" in stop_warning(summary)
    assert stop_warning({"stop_rate": 0.95}) is None
