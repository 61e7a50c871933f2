"""Batched encoding: the direct backend call gives the tokenizer's own ids, the flat table gives the same examples
and counts as the per-row reference, and the index-based split is the row-based one."""

from __future__ import annotations

import random

import numpy as np
import pytest
from reference_encoding import encode_rows
from tricky_rows import TRICKY_ROWS

from kotune.data.encoding import cuts_at_words, encode_flat, encode_segments, encode_table, word_pieces
from kotune.data.examples import ExampleTable
from kotune.data.formats import Rendered, detect_format, render_alpaca, render_prompt_completion
from kotune.data.read import split_indices
from kotune.data.templates import KO_ALPACA


def tricky_texts() -> list[str]:
    texts = []
    for row in TRICKY_ROWS.values():
        texts += [KO_ALPACA.format(row["instruction"], row.get("input")), row["output"]]
    return texts + ["", " ", "<|eot_id|>안녕<|end_of_text|>", '###답변:\n"인용"', "a\r\n\r\nb", "😊" * 3]


def test_backend_call_gives_the_tokenizers_own_ids(llama3_tokenizer):
    texts = tricky_texts()
    assert encode_segments(llama3_tokenizer, texts) == llama3_tokenizer(texts, add_special_tokens=False)["input_ids"]


# Fragments chosen to meet at line starts in every way the pre-tokenizer regex distinguishes: letters, digits,
# punctuation runs, quotes, contractions, special tokens, and whitespace the regex and Python see differently.
FRAGMENTS = [
    "\n",
    "\n",
    "\n\n",
    "\r\n",
    " \n",
    "\t\n",
    "\n ",
    "\n\t",
    "\u00a0",
    "\u3000",
    "\x1c",
    "\u2028",
    "\u0085",
    " ",
    "  ",
    "\t",
    "###답변:",
    "###입력:",
    ":",
    "#",
    '"',
    "'s",
    "'",
    "(",
    "-",
    "...",
    "?!",
    "\u0301",
    "123",
    "4567",
    "서울",
    "한국어",
    "안녕하세요",
    "a",
    "Hello",
    "world",
    "<|eot_id|>",
    "<|begin_of_text|>",
    "😊",
    "é",
    "ㄱ",
    ".",
]


def fuzz_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 14))) for _ in range(n)]


def test_llama3_ids_are_unchanged_by_cutting_at_words(llama3_tokenizer):
    assert cuts_at_words(llama3_tokenizer)
    texts = fuzz_texts(3000, seed=0) + tricky_texts()
    texts += [KO_ALPACA.format(t, None) for t in texts[:200]]  # template lines shared by many texts
    flat, counts = encode_flat(llama3_tokenizer, texts, by_word=True)
    expected = encode_segments(llama3_tokenizer, texts)
    assert counts.tolist() == [len(ids) for ids in expected]
    assert flat.tolist() == [t for ids in expected for t in ids]
    assert sum("\n" in t for t in texts) > 1000  # the cuts were exercised, not skipped
    assert sum(len(word_pieces(t)) > 1 for t in texts) > 1000


def test_gpt2_style_pre_tokenizers_are_not_cut_at_lines(llama3_tokenizer):
    """GPT-2's regex pre-tokenizes "a \n" + "b" differently from "a \nb": kotune must not cut such tokenizers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    gpt2_style = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    whole = [p for p, _ in gpt2_style.pre_tokenize_str("a \nb")]
    cut = [p for text in ("a \n", "b") for p, _ in gpt2_style.pre_tokenize_str(text)]
    assert whole != cut
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = gpt2_style
    assert not cuts_at_words(PreTrainedTokenizerFast(tokenizer_object=backend))
    llama3 = Tokenizer.from_str(llama3_tokenizer.backend_tokenizer.to_str())
    llama3.normalizer = normalizers.NFC()  # a normalizer may join characters across the cut
    assert not cuts_at_words(PreTrainedTokenizerFast(tokenizer_object=llama3))


def test_added_tokens_holding_a_space_or_newline_stop_the_cuts(llama3_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    assert cuts_at_words(tokenizer)
    tokenizer.add_tokens(["\n###"])
    assert not cuts_at_words(tokenizer)
    spaced = AutoTokenizer.from_pretrained(llama3_dir)
    spaced.add_tokens(["### 답변"])
    assert not cuts_at_words(spaced)


def rendered_rows(n: int, seed: int) -> list[Rendered]:
    rng = random.Random(seed)
    rows = list(TRICKY_ROWS.values())
    out = []
    for i in range(n):
        source = {**rng.choice(rows), "_row": i}
        if i % 11 == 0:  # conversation-like: no EOS appended, untrained text after the last trained segment
            out.append(Rendered(i, [("질문", False), ("답<|eot_id|>", i % 2 == 0), ("꼬리 " * (i % 9), False)], False))
        elif i % 4 == 3:
            out.append(render_prompt_completion({"prompt": "p" * (i % 7), "completion": "", "_row": i}, False, ""))
        else:
            out.append(render_alpaca(source, KO_ALPACA, train_on_inputs=i % 5 == 0, where=""))
    return out


@pytest.mark.parametrize("cutoff", [4, 24, 48, 4098])
def test_flat_table_equals_the_per_row_reference(llama3_tokenizer, cutoff):
    rendered = rendered_rows(200, seed=cutoff)
    reference, ref_stats = encode_rows(llama3_tokenizer, rendered, cutoff, batch_size=64)
    encoded = encode_table(llama3_tokenizer, rendered, len(rendered), {}, cutoff, batch_size=64)
    assert [(e.row, e.input_ids, e.labels) for e in encoded.examples] == [
        (e.row, e.input_ids, e.labels) for e in reference
    ]
    stats = encoded.stats(range(len(rendered)))
    assert (stats.rows, stats.kept, stats.truncated, stats.eos_lost) == (
        ref_stats.rows,
        ref_stats.kept,
        ref_stats.truncated,
        ref_stats.eos_lost,
    )
    assert stats.skipped_rows == ref_stats.skipped_rows


def test_rows_skipped_before_encoding_are_counted(llama3_tokenizer):
    rendered = [r for r in rendered_rows(10, seed=1) if r.row not in (2, 5)]
    encoded = encode_table(llama3_tokenizer, rendered, 10, {2: "null output", 5: "null output"}, 4098)
    stats = encoded.stats([5, 0, 2, 1])
    assert (stats.rows, stats.kept) == (4, 2) and stats.skipped_rows == {"null output": [5, 2]}
    assert [e.row for e in encoded.select([5, 1, 0, 2])] == [1, 0]


def table_from_lists(rows: list[int], ids: list[list[int]], labels: list[list[int]]) -> ExampleTable:
    """An ``ExampleTable`` of rows written out as lists, laid end to end as ``from_arrays`` takes them."""
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    flat_ids = np.array([t for i in ids for t in i], dtype=np.int32)
    flat_labels = np.array([t for label in labels for t in label], dtype=np.int32)
    return ExampleTable.from_arrays(np.asarray(rows, dtype=np.int64), lengths, flat_ids, flat_labels)


def split_rows(rows: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) rows as the package's ``split_rows`` returned them before only indices were kept."""
    train, validation = split_indices(len(rows), val_size, seed)
    return [rows[i] for i in train], [rows[i] for i in validation]


def test_example_table_indexing():
    table = table_from_lists([7, 8, 9], [[1, 2], [3], [4, 5, 6]], [[-100, 2], [3], [-100, -100, 6]])
    assert len(table) == 3 and table[-1].row == 9 and table[1].input_ids == [3]
    assert [e.row for e in table[::2]] == [7, 9]
    assert [e.labels for e in table] == [[-100, 2], [3], [-100, -100, 6]]  # iteration stops at IndexError
    picked = table.take([2, 0])
    assert [(e.row, e.input_ids) for e in picked] == [(9, [4, 5, 6]), (7, [1, 2])]
    assert picked.lengths().tolist() == [3, 2] and len(table_from_lists([], [], [])) == 0


@pytest.mark.parametrize(("n", "val_size", "seed"), [(1, 0.5, 0), (10, 0.0, 1), (10, 0.2, 42), (1001, 0.005, 3)])
def test_index_split_is_the_row_split(n, val_size, seed):
    rows = [{"_row": i} for i in range(n)]
    by_rows = split_rows(rows, val_size, seed)
    train, validation = split_indices(n, val_size, seed)
    assert [r["_row"] for r in by_rows[0]] == train and [r["_row"] for r in by_rows[1]] == validation


def test_format_detection_by_columns():
    assert detect_format([{"instruction": "a", "output": "b"}], "") == "alpaca"
    assert detect_format([{"prompt": "a", "completion": "b"}], "") == "prompt_completion"
    assert detect_format([{"messages": []}], "") == "messages"
    assert detect_format([{"conversations": []}], "") == "sharegpt"


def test_prompt_completion_masks_the_prompt(llama3_tokenizer):
    rendered = render_prompt_completion({"prompt": "질문: 수도는?", "completion": " 서울", "_row": 0}, False, "")
    (example,), _ = encode_rows(llama3_tokenizer, [rendered], 4098)
    completion = llama3_tokenizer(" 서울", add_special_tokens=False)["input_ids"]
    assert [t for t in example.labels if t != -100] == completion + [llama3_tokenizer.eos_token_id]
