"""``kotune export`` when things go wrong: an export killed mid-write, a full disk, a refused tokenizer, a base the
exporter and merge cannot handle. Each ends in one ``kotune: error:`` line (or a note) and leaves no stray file or
folder. Models are the tiny ones of ``test_export_gguf`` (the mock tokenizer: seconds)."""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, build_tiny_model
from test_export_gguf import mock_tokenizer

from kotune.cli import main
from kotune.data.encoding import LLAMA3_SPLIT
from kotune.data.templates import KO_ALPACA
from kotune.export import atomic
from kotune.export import gguf as exporting
from kotune.export.gguf import ExportError, write_gguf
from kotune.run_folder import ADAPTER_CONFIG, CONFIG, save_template


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """The tiny Llama over the mock tokenizer, a plain model folder."""
    folder = tmp_path_factory.mktemp("small")
    return Path(build_tiny_model(folder / "model", mock_tokenizer(folder / "tokenizer", LLAMA3_SPLIT)))


def as_merged(model: Path, tiny_train_config, into: Path) -> Path:
    """A copy of ``model`` with a merge's run records: config (alpaca rows) and the ko-alpaca template."""
    shutil.copytree(model, into)
    cfg = tiny_train_config(into.parent / "run", {"data.format": "alpaca"})
    (into / CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    save_template(KO_ALPACA, into)
    return into


KILLED_EXPORT = """
import os, sys
from pathlib import Path
from kotune.export.atomic import partial_file
with partial_file(Path(sys.argv[1]), 0) as partial:
    partial.write_bytes(b"GGUF half written")
    os.kill(os.getpid(), 9)
"""


def test_a_killed_exports_partial_file_is_removed_by_the_next_export(small, tmp_path, capsys):
    """``kill -9`` mid-write leaves ``.NAME.gguf.partial-*``; the next export of that file removes it and says so,
    and leaves alone a partial another export is still writing (locked)."""
    out = tmp_path / "model.gguf"
    killed = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out)], cwd=ROOT, env={"PYTHONPATH": "src"})
    assert killed.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".model.gguf.partial-*")
    in_use = tmp_path / ".model.gguf.partial-busy"
    with open(in_use, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        write_gguf(small, out, "f16", None, [1])
    assert not stale.exists() and in_use.exists()
    assert f"removed 1 partial file(s) left by an interrupted export: {stale.name}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_use.name, "model.gguf"]


def test_a_full_disk_is_refused_before_anything_is_written(small, tmp_path, monkeypatch):
    """Too little free space for the estimated file: one error naming both sizes, no folder made."""
    out = tmp_path / "new" / "model.gguf"
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real._replace(free=100_000))
    with pytest.raises(ExportError, match=r"model.gguf: needs about 0\.\d\d GB and .* has 0\.00 GB free; free some"):
        write_gguf(small, out, "f16", None, [1])
    assert not out.parent.exists()


def test_the_size_estimate_is_not_below_the_file(small, tmp_path, monkeypatch):
    needed = []
    check = atomic.check_free_space
    monkeypatch.setattr(atomic, "check_free_space", lambda out, n: needed.append(n) or check(out, n))
    for quant in ("f32", "q8_0"):
        size = write_gguf(small, tmp_path / f"{quant}.gguf", quant, None, [1]).stat().st_size
        assert size <= needed[-1] <= size + (2 << 20), quant


def test_a_write_that_fails_anyway_leaves_no_partial_file(small, tmp_path, monkeypatch):
    """The disk fills up during the write (another process): an ExportError naming the file, nothing left."""

    def full(array, qtype):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporting, "encode_tensor", full)
    with pytest.raises(ExportError, match=r"model.gguf: could not be written .*No space left"):
        write_gguf(small, tmp_path / "model.gguf", "f16", None, [1])
    assert list(tmp_path.iterdir()) == []


def test_a_refused_tokenizer_leaves_no_ollama_folder(small, tmp_path, tiny_train_config, capsys):
    """A tokenizer export refuses (a SentencePiece-style decoder) ends in one error line naming it; ``--out`` is
    not made."""
    merged = as_merged(small, tiny_train_config, tmp_path / "merged")
    data = json.loads((merged / "tokenizer.json").read_text(encoding="utf-8"))
    data["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (merged / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    out = tmp_path / "ollama"
    assert main(["export", str(merged), "--format", "ollama", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "kotune: error: kotune exports byte-level BPE tokenizers" in err and "BPE with a Metaspace decoder" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tiny_train_config) -> Path:
    """A run folder as far as merge and export read it before loading weights: a 4-bit run on a tiny GPT-2."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(mock_tokenizer(root / "tokenizer", LLAMA3_SPLIT))
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    run = root / "run"
    run.mkdir()
    overrides = {"model.path": str(root / "base"), "model.quantization": "4bit", "data.format": "alpaca"}
    (run / CONFIG).write_text(tiny_train_config(run, overrides).to_yaml(), encoding="utf-8")
    save_template(KO_ALPACA, run)
    (run / ADAPTER_CONFIG).write_text("{}", encoding="utf-8")
    return run


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["merge"], "kotune merge cannot fold a 4bit-trained adapter into model_type 'gpt2' (GPT2LMHeadModel)"),
        (
            ["export", "--format", "gguf"],
            "kotune cannot export GPT2LMHeadModel (model_type 'gpt2') to GGUF yet; it exports",
        ),
    ],
)
def test_a_gpt2_run_is_refused_before_loading(gpt2_run, command, message, capsys):
    """GPT-2's Conv1D projections: merge and export stop with one line naming the model type and what they
    support, instead of a tensor-size RuntimeError; nothing is written into the run."""
    before = sorted(p.name for p in gpt2_run.iterdir())
    assert main([command[0], str(gpt2_run), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kotune: error: {message}") and "Traceback" not in err
    assert "Llama" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in gpt2_run.iterdir()) == before
