"""``data.dedup``: exact copies (after normalising) and near copies (MinHash), within and across sources, counted
exactly on a constructed set, reported per source, and left out of training or kept as the policy says."""

from __future__ import annotations

import json
import random

import pytest
from conftest import write_jsonl

from kotune.config_load import config_from_text
from kotune.data.dedup import Duplicate, find_duplicates, normalise
from kotune.data.prepare import prepare


def quiet(_: str) -> None:
    pass


def hangul(seed: int, n: int = 120) -> str:
    """Random Hangul syllables in words: texts of different seeds share next to no 5-gram."""
    rng = random.Random(seed)
    chars = [chr(rng.randrange(0xAC00, 0xD7A4)) for _ in range(n)]
    return " ".join("".join(chars[i : i + 4]) for i in range(0, n, 4))


A = [hangul(i) for i in range(10)]
B = [hangul(100 + i) for i in range(4)]
B[0] = A[3]  # exact copy across sources
B[1] = A[7][:50] + "X" + A[7][51:]  # one character changed: near copy across sources
A[5] = "  " + A[2].replace(" ", "   ").upper() + " "  # exact after normalising (spaces; Hangul has no case)
A[8] = A[1][:-6]  # the end cut short: near copy within the source
KNOWN_EXACT = [Duplicate(0, 5, 0, 2, "exact"), Duplicate(1, 0, 0, 3, "exact")]
KNOWN_NEAR = [Duplicate(0, 8, 0, 1, "near"), Duplicate(1, 1, 0, 7, "near")]


def numbered(texts):
    return list(enumerate(texts))


def test_normalise_folds_width_case_and_spaces():
    assert normalise("  Ａｂ\u3000  C\n") == normalise("ab c") == "ab c"


def test_exact_duplicates_within_and_across_sources():
    assert find_duplicates([numbered(A), numbered(B)], "exact") == KNOWN_EXACT


@pytest.mark.compat("datasketch")
def test_near_duplicates_by_minhash():
    found = find_duplicates([numbered(A), numbered(B)], "near")
    assert found == sorted(KNOWN_EXACT + KNOWN_NEAR, key=lambda d: (d.source, d.row))


@pytest.fixture
def two_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))

    def make(dedup: str):
        sources = []
        for name, texts in (("a", A), ("b", B)):
            path = write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": "", "completion": t} for t in texts])
            sources.append({"path": str(path), "name": name})
        return config_from_text(json.dumps({"data": {"sources": sources, "val_size": 0, "dedup": dedup}}), "t")

    return make


@pytest.mark.compat("datasketch")
def test_the_audit_reports_them_per_source_and_training_leaves_them_out(two_sources, mock_tokenizer):
    data = prepare(two_sources("near").data, mock_tokenizer, log=quiet)
    by_source = {r.source.rsplit("/", 1)[-1]: [f for f in r.findings if f.code == "duplicates"] for r in data.audits}
    (a,), (b,) = by_source["a.jsonl"], by_source["b.jsonl"]
    assert a.rows == [5, 8] and b.rows == [0, 1]
    assert a.message.startswith("2 rows repeat an earlier row (20.0% of 10: 1 exact, 1 near, 0 of another source)")
    assert b.message.startswith("2 rows repeat an earlier row (50.0% of 4: 1 exact, 1 near, 2 of another source)")
    assert "row 0 = a row 3; row 1 ≈ a row 7" in b.message and "left out" in b.message
    trained = {(e.source, e.row) for e in data.train}
    assert len(trained) == len(data.train) == 10 + 4 - 4
    assert not trained & {(0, 5), (0, 8), (1, 0), (1, 1)}
    assert data.train_stats.skipped["duplicate of an earlier row (data.dedup) (b)"] == 2


def test_exact_is_the_default_and_off_keeps_them_but_says_so(two_sources, mock_tokenizer):
    exact = prepare(two_sources("exact").data, mock_tokenizer, log=quiet)
    assert {(e.source, e.row) for e in exact.train} == {(s, r) for s in (0, 1) for r in range(len((A, B)[s]))} - {
        (0, 5),
        (1, 0),
    }
    kept = prepare(two_sources("off").data, mock_tokenizer, log=quiet)
    assert len(kept.train) == 14
    found = [f for r in kept.audits for f in r.findings if f.code == "duplicates"]
    assert [(f.level, f.rows) for f in found] == [("warning", [5]), ("warning", [0])]
    assert all("kept (data.dedup=off" in f.message for f in found)
