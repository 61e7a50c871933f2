"""Mistakes in what a run points at stop ``kotune train`` with one ``kotune: error:`` line, before the model loads
where they can be known then, and a local-looking path is never sent to the hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_ROWS, write_jsonl
from safetensors.torch import save_file

from kotune.cli import main
from kotune.paths import looks_local

MODEL_LOADED = "trainable params:"
"""Printed by kotune.training.build.load_for_training: seeing it means the model was loaded."""


def kotune_train(tiny_train_config, tmp_path: Path, overrides: dict, capsys) -> tuple[int, str, str]:
    config = tmp_path / "run.yaml"
    config.write_text(tiny_train_config(tmp_path / "run", overrides).to_yaml(), encoding="utf-8")
    code = main(["train", str(config)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kotune: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "path",
    ["/nonexistent/kotune-model", "./no-such-model", "models/no-such-model", "~/no-such-kotune-model"],
)
def test_a_missing_local_model_path_is_named_without_asking_the_hub(
    tiny_train_config, tmp_path, monkeypatch, capsys, path
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a hub request would fail loudly, not pass
    code, out, err = kotune_train(tiny_train_config, tmp_path, {"model.path": path}, capsys)
    assert code == 2
    assert one_error_line(err).startswith(f"kotune: error: model.path {path}: no such folder")
    assert MODEL_LOADED not in out


def test_hub_names_are_not_taken_for_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("beomi/Llama-3-Open-Ko-8B") and not looks_local("gpt2")
    (tmp_path / "beomi").mkdir()  # unless a folder of that name is here
    assert looks_local("beomi/Llama-3-Open-Ko-8B")
    assert all(looks_local(p) for p in ("./m", "../m", "/m", "~/m", "a/b/c"))


def test_a_model_folder_with_only_a_tokenizer_is_refused(tiny_train_config, llama3_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(llama3_dir, tmp_path / "tokenizer-only"))
    code, out, err = kotune_train(tiny_train_config, tmp_path, {"model.path": str(folder)}, capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"model folder {folder} has no config.json and no weights (*.safetensors)" in line
    assert "tokenizer.json" in line and MODEL_LOADED not in out


@pytest.mark.parametrize("path", ["./no-such-data", "data/no-such-folder"])
def test_a_missing_local_data_folder_is_not_taken_for_a_hub_dataset(
    tiny_train_config, tmp_path, monkeypatch, capsys, path
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code, out, err = kotune_train(tiny_train_config, tmp_path, {"data.path": path}, capsys)
    assert code == 2
    assert one_error_line(err) == f"kotune: error: {path}: file not found"
    assert MODEL_LOADED not in out


def test_target_modules_that_match_nothing_are_named_before_the_model_loads(tiny_train_config, tmp_path, capsys):
    code, out, err = kotune_train(tiny_train_config, tmp_path, {"lora.target_modules": "[q_proj, qkv_proj]"}, capsys)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith("kotune: error: 'lora.target_modules': qkv_proj match no module of ")
    assert "its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in line
    assert MODEL_LOADED not in out


def test_weights_missing_from_the_files_are_an_error_not_a_random_model(
    tiny_train_config, tiny_llama3_model, tmp_path, capsys
):
    # the real weights in pytorch_model.bin, and a model.safetensors of something else, which is what loads
    folder = Path(shutil.copytree(tiny_llama3_model, tmp_path / "mixed"))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    save_file({"unrelated.weight": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "train.jsonl", TINY_TRAIN_ROWS)
    code, _, err = kotune_train(
        tiny_train_config, tmp_path, {"model.path": str(folder), "data.path": str(data)}, capsys
    )
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("kotune: error: ")]  # after transformers' output
    assert f"model {folder}: " in line and "weights are missing from its files" in line
    assert "model.embed_tokens.weight" in line or "lm_head.weight" in line
