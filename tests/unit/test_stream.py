"""``data.streaming``: a JSON Lines source tokenized chunk by chunk into cache shards gives the examples the whole
source does; an interrupted tokenization continues from its last finished shard to the same entry; the tokens are
memory-mapped; ``packing: full`` packs within windows; settings that need every row at once are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_jsonl

from kotune.config import ConfigError
from kotune.config_load import config_from_text
from kotune.data import stream
from kotune.data.examples import ExampleTable
from kotune.data.packing import pack_best_fit, pack_windows
from kotune.data.prepare import chunk_encoder, prepare
from kotune.data.templates import load_template


def quiet(_: str) -> None:
    pass


def rows(n: int) -> list[dict]:
    out = [{"prompt": f"질문 {i} " + "가" * (i % 9), "completion": f"답변 {i}" + " 나" * (i % 5)} for i in range(n)]
    out[5]["completion"] = None  # skipped in its chunk, as in the whole source
    return out


def config(path, *lines: str):
    data = {"path": str(path), "val_size": 0.1, "cutoff_len": 64}
    for line in lines:
        key, _, value = line.partition("=")
        data[key] = json.loads(value)
    return config_from_text(json.dumps({"data": data}), "test.yaml")


def signature(examples) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    return [(e.row, tuple(e.input_ids), tuple(e.labels)) for e in examples]


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A 50-row file with a blank line, read 7 rows a chunk (8 shards); the cache in tmp_path."""
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stream, "CHUNK_ROWS", 7)
    path = write_jsonl(tmp_path / "rows.jsonl", rows(50))
    lines = path.read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join([*lines[:20], "", *lines[20:]]), encoding="utf-8")
    return path


def test_streamed_examples_are_the_whole_sources(source, mock_tokenizer):
    whole = prepare(config(source).data, mock_tokenizer, log=quiet)
    streamed = prepare(config(source, "streaming=true").data, mock_tokenizer, log=quiet)
    assert signature(streamed.train) == signature(whole.train) and len(whole.train) == 44
    assert signature(streamed.validation) == signature(whole.validation)
    assert streamed.train_stats.summary() == whole.train_stats.summary()
    assert isinstance(streamed.train, ExampleTable) and isinstance(streamed.train.ids, np.memmap)
    (folder,) = (source.parent / "cache" / "data").glob("*-stream")
    assert len(list(folder.glob("shard-*.npz"))) == 8
    assert [f.code for f in streamed.audits[0].findings] == ["streamed"] and streamed.audits[0].rows == 50


def test_an_interrupted_tokenization_continues_to_the_same_entry(source, mock_tokenizer, tmp_path):
    data = config(source, "streaming=true").data
    encode = chunk_encoder(str(source), data, mock_tokenizer, load_template(data.template))
    whole = stream.tokenize_to_shards(str(source), data, tmp_path / "whole", encode, quiet)
    part = tmp_path / "part"
    assert not stream.tokenize_to_shards(str(source), data, part, encode, quiet, stop_after=3)["done"]
    with (part / stream.IDS).open("ab") as f:  # a fourth shard's tokens written, its index never: a crash
        f.write(b"\x07" * 40)
    said = []
    resumed = stream.tokenize_to_shards(str(source), data, part, encode, said.append)
    assert "continuing an interrupted tokenization at row 21" in said[0]
    assert resumed == whole
    a, b = stream.load_shards(tmp_path / "whole"), stream.load_shards(part)
    assert signature(a.examples) == signature(b.examples)
    assert (part / stream.IDS).stat().st_size == (tmp_path / "whole" / stream.IDS).stat().st_size
    for name in ("length", "truncated", "eos_lost", "skip"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_a_bad_line_is_named_by_file_and_line(source, mock_tokenizer):
    text = source.read_text(encoding="utf-8").split("\n")
    source.write_text("\n".join([*text[:30], "{not json", *text[30:]]), encoding="utf-8")
    with pytest.raises(Exception, match=r"rows.jsonl line 31 is not valid JSON"):
        prepare(config(source, "streaming=true").data, mock_tokenizer, log=quiet)


def test_settings_that_need_every_row_at_once_are_refused(source):
    with pytest.raises(ConfigError, match=r"'data.dedup' compares every row's text at once; with 'data.streaming'"):
        config(source, "streaming=true", 'dedup="exact"')


def test_packing_in_windows_fills_sequences_as_packing_the_whole_set_nearly_does():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 900, size=5000).tolist()
    whole = pack_best_fit(lengths, 2048, 0)
    windows = pack_windows(lengths, 2048, 0, 1000)
    assert sorted(i for p in windows for i in p) == list(range(5000))
    assert all(sum(lengths[i] for i in p) <= 2048 for p in windows)
    assert len(whole) <= len(windows) <= len(whole) + 5  # at most one emptier sequence a window
    assert windows == pack_windows(lengths, 2048, 0, 1000)  # a function of (lengths, seed)


def test_a_streamed_run_packs_full_within_windows(monkeypatch):
    from kotune.data import order

    monkeypatch.setattr(order, "PACK_WINDOW", 700)
    lengths = np.random.default_rng(1).integers(20, 300, size=3000).tolist()
    whole = config_from_text(json.dumps({"data": {"cutoff_len": 1024}, "train": {"packing": "full"}}), "a.yaml")
    streamed = config_from_text(
        json.dumps({"data": {"cutoff_len": 1024, "streaming": True}, "train": {"packing": "full"}}), "b.yaml"
    )
    assert order.sequences(lengths, streamed) == pack_windows(lengths, 1024, streamed.train.seed, 700)
    assert order.sequences(lengths, whole) == pack_best_fit(lengths, 1024, whole.train.seed)


def test_a_second_tokenization_of_an_entry_waits_for_the_first(source, mock_tokenizer, tmp_path):
    import fcntl
    import threading

    data = config(source, "streaming=true").data
    encode = chunk_encoder(str(source), data, mock_tokenizer, load_template(data.template))
    folder = tmp_path / "entry"
    folder.mkdir()
    with (folder / stream.LOCK).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run is writing this entry
        done = []
        worker = threading.Thread(
            target=lambda: done.append(stream.tokenize_to_shards(str(source), data, folder, encode, quiet))
        )
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and not (folder / stream.MANIFEST).exists()
    worker.join(timeout=30)
    assert done and done[0]["done"] and done[0]["rows"] == 50
