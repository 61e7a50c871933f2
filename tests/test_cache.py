"""The tokenization cache: a second run reuses it and says so; any change of data, tokenizer, template or
tokenization option makes a new entry; split options reuse it; entries are safetensors + JSON only."""

from __future__ import annotations

import pytest

from kotune.data.cache import cache_key, data_cache_dir
from kotune.data.prepare import prepare

ROWS = [
    {"instruction": f"질문 {i}", "input": "맥락" if i % 3 == 0 else "", "output": f"답변 {i} " * (1 + i % 5)}
    for i in range(40)
] + [{"instruction": "빈 답", "input": "", "output": None}]


def run(cfg, tokenizer):
    log: list[str] = []
    return prepare(cfg.data, tokenizer, log=log.append), log


def same(a, b) -> bool:
    """Two Prepared hold the same examples (rows, ids, labels), stats and audit."""
    for x, y in ((a.train, b.train), (a.validation, b.validation)):
        if [(e.row, e.input_ids, e.labels) for e in x] != [(e.row, e.input_ids, e.labels) for e in y]:
            return False
    return (a.train_stats, a.validation_stats, a.audits, a.format) == (
        b.train_stats,
        b.validation_stats,
        b.audits,
        b.format,
    )


def entries() -> list[str]:
    return sorted(p.name for p in data_cache_dir().iterdir()) if data_cache_dir().is_dir() else []


def test_second_run_reuses_the_cache_and_says_so(data_config, llama3_train_tokenizer):
    cfg = data_config(ROWS, "data.val_size=0.1")
    first, log1 = run(cfg, llama3_train_tokenizer)
    second, log2 = run(cfg, llama3_train_tokenizer)
    assert "tokenized 41 rows" in log1[0] and "cached in" in log1[0]
    assert "reused the tokenized data cached in" in log2[0]
    assert len(entries()) == 1
    assert same(first, second)
    assert first.train_stats.skipped == {"null output": 1} or first.validation_stats.skipped == {"null output": 1}


@pytest.mark.compat("pyarrow", "safetensors")
def test_cached_run_equals_an_uncached_one(data_config, llama3_train_tokenizer):
    cfg = data_config(ROWS, "data.val_size=0.2", "data.max_rows=20")
    run(cfg, llama3_train_tokenizer)
    cached, _ = run(cfg, llama3_train_tokenizer)
    cfg.data.cache = False
    fresh, log = run(cfg, llama3_train_tokenizer)
    assert "cached in" not in log[0] and "reused" not in log[0]
    assert same(cached, fresh) and len(cached.train) == 20


@pytest.mark.parametrize(
    "change",
    [
        "data.cutoff_len=16",
        "data.train_on_inputs=true",
        "data.template=alpaca",
        "data.columns={output: instruction, instruction: output}",
        "data.format=prompt_completion",
        "data.chat_template=plain",
    ],
)
def test_a_changed_option_makes_a_new_entry(data_config, llama3_train_tokenizer, change):
    rows = ROWS if "prompt_completion" not in change else [{"prompt": "p", "completion": "c"}]
    run(data_config(rows), llama3_train_tokenizer)
    _, log = run(data_config(rows, change), llama3_train_tokenizer)
    assert "tokenized" in log[0] and "reused" not in log[0]
    assert len(entries()) == 2


def test_changed_data_content_makes_a_new_entry(data_config, llama3_train_tokenizer):
    before, _ = run(data_config(ROWS), llama3_train_tokenizer)
    changed = [dict(r) for r in ROWS]
    changed[0]["output"] = "다른 답변 0"
    after, log = run(data_config(changed), llama3_train_tokenizer)
    assert "tokenized" in log[0] and len(entries()) == 2
    assert not same(before, after)


def test_same_size_edit_is_still_seen(data_config, llama3_train_tokenizer, tmp_path):
    cfg = data_config(ROWS)
    run(cfg, llama3_train_tokenizer)
    path = tmp_path / "data.jsonl"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('질문 1"', '질문 7"', 1), encoding="utf-8")  # same size, same line count
    _, log = run(cfg, llama3_train_tokenizer)
    assert "tokenized" in log[0]


def test_a_different_tokenizer_makes_a_new_entry(data_config, llama3_dir, llama3_train_tokenizer):
    from transformers import AutoTokenizer

    cfg = data_config(ROWS)
    run(cfg, llama3_train_tokenizer)
    other = AutoTokenizer.from_pretrained(llama3_dir)
    other.pad_token = other.eos_token
    other.add_tokens(["답변"])
    _, log = run(cfg, other)
    assert "tokenized" in log[0] and len(entries()) == 2


def test_split_options_reuse_the_entry(data_config, llama3_train_tokenizer):
    run(data_config(ROWS, "data.val_size=0.1"), llama3_train_tokenizer)
    cfg = data_config(ROWS, "data.val_size=0.3", "data.seed=7")
    cached, log = run(cfg, llama3_train_tokenizer)
    assert "reused" in log[0]
    cfg.data.cache = False
    assert same(cached, run(cfg, llama3_train_tokenizer)[0])


def test_entries_are_safetensors_and_json_only(data_config, llama3_train_tokenizer):
    run(data_config(ROWS), llama3_train_tokenizer)
    (entry,) = entries()
    assert sorted(p.name for p in (data_cache_dir() / entry).iterdir()) == ["meta.json", "tokens.safetensors"]


def test_an_incomplete_entry_is_rebuilt(data_config, llama3_train_tokenizer):
    cfg = data_config(ROWS)
    first, _ = run(cfg, llama3_train_tokenizer)
    (entry,) = entries()
    (data_cache_dir() / entry / "meta.json").unlink()
    again, log = run(cfg, llama3_train_tokenizer)
    assert "tokenized" in log[0] and same(first, again)


def test_hub_datasets_are_not_cached_here(llama3_train_tokenizer):
    from kotune.config import DataConfig

    assert cache_key("someone/some-dataset", DataConfig(), llama3_train_tokenizer, {}) is None


@pytest.mark.compat("pyarrow")
def test_cached_arrays_are_memory_mapped_read_only(data_config, llama3_train_tokenizer):
    cfg = data_config(ROWS)
    run(cfg, llama3_train_tokenizer)
    cached, _ = run(cfg, llama3_train_tokenizer)
    assert not cached.train.ids.flags.writeable
    with pytest.raises(ValueError):
        cached.train.ids[0] = 1


def test_cli_second_run_says_it_reused_the_cache(tmp_path, tiny_llama3_model, monkeypatch, capsys):
    from conftest import write_jsonl

    from kotune.cli import main

    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tiny_llama3_model}}}\ndata: {{path: {data}}}\n", encoding="utf-8")
    assert main(["data", "preview", str(config), "--json", "--limit", "2"]) == 0
    first = capsys.readouterr()
    assert main(["data", "preview", str(config), "--json", "--limit", "2"]) == 0
    second = capsys.readouterr()
    assert "tokenized 41 rows" in first.err and "reused the tokenized data" in second.err
    assert first.out == second.out and len(first.out.splitlines()) == 2
