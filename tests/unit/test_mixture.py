"""``data.sources``: the mixture is a seeded function of the config, each source gets the share its weight or
epochs say, every example remembers its source, and a bad source is one error line naming it."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter

import pytest
from conftest import write_jsonl

from kotune.cli import main
from kotune.config import ConfigError
from kotune.config_load import config_from_text
from kotune.data.prepare import prepare
from kotune.data.read import DataError, split_indices


def quiet(_: str) -> None:
    pass


def rows(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"{tag} question {i}", "completion": f"{tag} answer {i}"} for i in range(n)]


@pytest.fixture
def mixture(tmp_path, monkeypatch):
    """``make(sources, *data_lines)``: a config whose ``data.sources`` are ``(name, rows, settings)`` written as
    jsonl files (YAML, as a user writes it); the cache in tmp_path."""
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))

    def make(sources, *lines: str):
        entries = []
        for name, source_rows, settings in sources:
            path = write_jsonl(tmp_path / f"{name}.jsonl", source_rows)
            entries.append({"path": str(path), **settings})
        data = {"val_size": 0, "sources": entries}
        for line in lines:
            key, _, value = line.partition("=")
            data[key] = json.loads(value)
        return config_from_text(json.dumps({"data": data}), "test.yaml")

    return make


THREE = [("a", rows("a", 10), {"weight": 2}), ("b", rows("b", 20), {"weight": 1}), ("c", rows("c", 5), {"epochs": 2})]
"""Weighted a and b fill the 30 rows they hold 2:1 (a 20: each row twice; b 10 of its 20); c twice over: 10."""


def signature(examples) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(e.source, e.row, tuple(e.input_ids)) for e in examples]


def test_weights_and_epochs_set_each_sources_share(mixture, mock_tokenizer):
    data = prepare(mixture(THREE).data, mock_tokenizer, log=quiet)
    by_source = Counter(e.source for e in data.train)
    assert by_source == {0: 20, 1: 10, 2: 10}
    per_row = {s: Counter(e.row for e in data.train if e.source == s) for s in range(3)}
    assert per_row[0] == {r: 2 for r in range(10)}  # a: 20 of 10 rows, each twice (none thrice)
    assert len(per_row[1]) == 10 and set(per_row[1].values()) == {1}  # b: 10 distinct of its 20
    assert per_row[2] == {r: 2 for r in range(5)}
    assert [data.source_names[s].rsplit("/", 1)[-1] for s in range(3)] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    sources = {0: "a", 1: "b", 2: "c"}
    for e in data.train:  # each example's tokens are its source's row
        text = mock_tokenizer.decode(e.input_ids, skip_special_tokens=True)
        assert text == f"{sources[e.source]} question {e.row}{sources[e.source]} answer {e.row}"


def test_the_mixture_is_a_function_of_the_config_only(mixture, mock_tokenizer, tmp_path):
    cfg = mixture(THREE)
    first = signature(prepare(cfg.data, mock_tokenizer, log=quiet).train)
    assert signature(prepare(cfg.data, mock_tokenizer, log=quiet).train) == first  # the second from the cache
    assert len({s for s, _, _ in first[:15]}) == 3  # the sources are interleaved, not one after another
    reseeded = mixture(THREE, "seed=7")
    assert signature(prepare(reseeded.data, mock_tokenizer, log=quiet).train) != first
    # Another process with another hash seed (as a DDP rank or a resume is) builds the same list.
    script = (
        "import hashlib, json, sys; from kotune.config_load import load_config; from kotune.data.prepare import "
        "prepare; from kotune.config import ModelConfig; from kotune.model.load import load_tokenizer; "
        "cfg = load_config(sys.argv[1]); tok = load_tokenizer(sys.argv[2], ModelConfig()); "
        "d = prepare(cfg.data, tok, log=lambda _: None).train; "
        "print(hashlib.sha256(json.dumps([(e.source, e.row, e.input_ids) for e in d]).encode()).hexdigest())"
    )
    (tmp_path / "mix.yaml").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    env = {"PYTHONHASHSEED": "123", "PYTHONPATH": ":".join(sys.path), "KOTUNE_CACHE": str(tmp_path / "cache2")}
    other = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "mix.yaml"), mock_tokenizer.name_or_path],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    ours = hashlib.sha256(json.dumps([(s, r, list(i)) for s, r, i in first]).encode()).hexdigest()
    assert other == ours


def test_one_path_is_one_source_in_the_order_it_always_had(data_config, mock_tokenizer):
    cfg = data_config(rows("x", 40), "data.val_size=0.1")
    data = prepare(cfg.data, mock_tokenizer, log=quiet)
    train, validation = split_indices(40, 0.1, cfg.data.seed)
    assert [e.row for e in data.train] == train and [e.row for e in data.validation] == validation
    assert set(data.train.sources) == {0} and len(data.source_names) == 1


def test_each_source_holds_out_its_own_share(mixture, mock_tokenizer):
    sources = [("a", rows("a", 10), {"val_size": 0.2}), ("b", rows("b", 6), {}), ("c", rows("c", 4), {"max_rows": 3})]
    data = prepare(mixture(sources, "val_size=0.5").data, mock_tokenizer, log=quiet)
    assert Counter(e.source for e in data.validation) == {0: 2, 1: 3, 2: 2}
    assert Counter(e.source for e in data.train) == {0: 8, 1: 3, 2: 2}  # c: 2 train rows left, max_rows 3
    held = {(e.source, e.row) for e in data.validation}
    assert not held & {(e.source, e.row) for e in data.train}
    assert [a.source.rsplit("/", 1)[-1] for a in data.audits] == ["a.jsonl", "b.jsonl", "c.jsonl"]


def test_source_errors_name_the_source(mixture, mock_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources\[1\] \(.*b.jsonl\): 'weight' must be positive, got 0"):
        mixture([("a", rows("a", 3), {}), ("b", rows("b", 3), {"weight": 0})])
    with pytest.raises(ConfigError, match=r"unknown key 'wieght' in 'data.sources'; did you mean 'weight'"):
        mixture([("a", rows("a", 3), {"wieght": 1})])
    with pytest.raises(ConfigError, match=r"data.sources\[0\] .*set 'weight' or 'epochs', not both"):
        mixture([("a", rows("a", 3), {"weight": 1, "epochs": 1})])
    null = [{"prompt": "p", "completion": None}] * 2
    cfg = mixture([("a", rows("a", 3), {}), ("empty", null, {"name": "empty-set"})])
    with pytest.raises(DataError, match="data source empty-set: no trainable rows .*2 skipped: null completion"):
        prepare(cfg.data, mock_tokenizer, log=quiet)
    cfg.data.sources[0].path = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        prepare(cfg.data, mock_tokenizer, log=quiet)
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", rows("a", 2))
    write_jsonl(folder / "2.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    cfg.data.sources = cfg.data.sources[1:] + [type(cfg.data.sources[0])(path=str(folder))]
    with pytest.raises(DataError, match=r"mixed: mixed formats in one source: prompt_completion rows, but row 2 "):
        prepare(cfg.data, mock_tokenizer, log=quiet)


def test_a_bad_weight_is_one_error_line_before_anything_loads(tmp_path, capsys):
    data = write_jsonl(tmp_path / "a.jsonl", rows("a", 2))
    config = tmp_path / "c.yaml"
    sources = [{"path": str(data)}, {"path": str(data), "name": "again", "weight": -1}]
    config.write_text(json.dumps({"model": {"path": "/nonexistent"}, "data": {"sources": sources}}), encoding="utf-8")
    assert main(["train", str(config)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kotune: error: data.sources[1] (again): 'weight' must be positive, got -1.0"]


def test_preview_names_each_rows_source(tmp_path, mock_dir, monkeypatch, capsys):
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    sources = [
        {"path": str(write_jsonl(tmp_path / "a.jsonl", rows("a", 3))), "name": "ko"},
        {"path": str(write_jsonl(tmp_path / "b.jsonl", rows("b", 3))), "name": "en"},
    ]
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"path": mock_dir}, "data": {"sources": sources, "val_size": 0}}))
    assert main(["data", "preview", str(config), "--json", "--limit", "6"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["source"], r["row"]) for r in shown) == [(s, r) for s in ("en", "ko") for r in range(3)]
    assert main(["data", "preview", str(config), "--limit", "6"]) == 0
    text = capsys.readouterr().out
    assert all(f"── row {r} of {s}:" in text for s in ("en", "ko") for r in range(3))


def test_kotune_eval_asks_for_held_out_rows_of_a_mixed_run(mixture):
    from types import SimpleNamespace

    from kotune.evaluation.heldout import load_heldout

    folder = SimpleNamespace(config=mixture(THREE), path="runs/mixed")
    with pytest.raises(DataError, match=r"runs/mixed: the run trained on a mixture .* give held-out rows with --data"):
        load_heldout(folder, None, None)


def test_the_fingerprint_hashes_each_sources_files_not_its_path(mixture):
    from kotune.training.fingerprint import data_files, training_config

    cfg = mixture(THREE)
    files = data_files(cfg)
    assert sorted(k.split(":")[0] for k in files) == [
        "train[" + s + "]" for s in sorted(cfg.data.sources[i].label() for i in range(3))
    ]
    assert all("path" not in s for s in training_config(cfg)["data.sources"])
    assert [s["weight"] for s in training_config(cfg)["data.sources"]] == [2, 1, None]


BAD_SOURCES = {
    "missing": ({"path": "{tmp}/nowhere.jsonl", "name": "gone"}, r"nowhere.jsonl: file not found"),
    "no rows": ({"path": "{tmp}/null.jsonl", "name": "nulls"}, r"data source nulls: no trainable rows"),
    "mixed": ({"path": "{tmp}/mixed", "name": "two-kinds"}, r"mixed: mixed formats in one source"),
}


@pytest.mark.parametrize("case", BAD_SOURCES, ids=list(BAD_SOURCES))
def test_a_bad_source_is_one_error_line_naming_it_before_the_model_loads(
    case, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """The error ends the command before the model loads: nothing of the model's loading is said."""
    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "null.jsonl", [{"prompt": "p", "completion": None}] * 2)
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "1.jsonl", rows("a", 2))
    write_jsonl(tmp_path / "mixed" / "2.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    bad, message = BAD_SOURCES[case]
    sources = [
        {"path": str(write_jsonl(tmp_path / "a.jsonl", rows("a", 4)))},
        json.loads(json.dumps(bad).replace("{tmp}", str(tmp_path))),
    ]
    config = tmp_path / "c.yaml"
    model = {"path": tiny_model_dir, "quantization": "none", "compute_dtype": "float32"}
    config.write_text(json.dumps({"model": model, "data": {"sources": sources, "val_size": 0}}))
    assert main(["train", str(config), f"train.output_dir={tmp_path / 'run'}"]) != 0
    said = capsys.readouterr()
    err = [line for line in said.err.splitlines() if line.startswith("kotune: error:")]
    assert len(err) == 1 and re.search(message, err[0]), err
    assert "trainable params" not in said.out + said.err
