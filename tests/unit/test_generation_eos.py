"""The ``eos_token_id`` a run folder's and a merged folder's ``generation_config.json`` get from their stop ids:
one id, a list of several, or none at all when neither the tokenizer nor the template knows an end (no IndexError)."""

from __future__ import annotations

import json

import pytest

from kotune.config import Config
from kotune.data.templates import load_template
from kotune.run_folder import ModelFolder, generation_eos, save_run_tokenizer
from tests.unit.conftest import END, EOS, build_mock_tokenizer


def test_stop_ids_by_hand():
    assert generation_eos([EOS]) == EOS
    assert generation_eos([EOS, END]) == [EOS, END]
    assert generation_eos([]) is None


def test_a_gguf_headers_stop_ids_take_the_same_form():
    from kotune.model.assets import GgufSpecialTokens

    assert GgufSpecialTokens({}, {"eos": 2, "eot": 2}).stop_ids() == 2  # one id named twice
    assert GgufSpecialTokens({}, {"bos": 1, "eos": 2, "eot": 9}).stop_ids() == [2, 9]
    assert GgufSpecialTokens({}, {"bos": 1}).stop_ids() is None


@pytest.fixture
def no_end_tokenizer(tmp_path):
    """The mock tokenizer without EOS and without a chat template: nothing says where a reply ends."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_mock_tokenizer(tmp_path / "tokenizer", chat_template=None))
    tokenizer.eos_token = None
    return tokenizer


def folder(path) -> ModelFolder:
    path.mkdir()
    return ModelFolder(path, False, Config(), load_template("alpaca"), "alpaca")


def test_a_run_folder_without_an_end_token_writes_no_eos(tmp_path, no_end_tokenizer):
    run = folder(tmp_path / "run")
    save_run_tokenizer(run, no_end_tokenizer, None)
    written = json.loads((run.path / "generation_config.json").read_text(encoding="utf-8"))
    assert "eos_token_id" not in written and written["pad_token_id"] == no_end_tokenizer.pad_token_id


def test_a_merged_folder_without_an_end_token_writes_no_eos(tmp_path, tiny_model_dir, no_end_tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from kotune.export.merge import save_merged

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = None
    save_merged(model, no_end_tokenizer, folder(tmp_path / "run"), tmp_path / "merged")
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id is None
    assert "eos_token_id" not in (tmp_path / "merged" / "generation_config.json").read_text(encoding="utf-8")


def test_a_merged_folder_stops_at_eos_and_end_of_turn(tmp_path, tiny_model_dir, mock_tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from kotune.export.merge import save_merged

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_merged(model, mock_tokenizer, folder(tmp_path / "run"), tmp_path / "merged")
    # the tokenizer's EOS and the chat template's end of turn
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [EOS, END]
