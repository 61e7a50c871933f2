"""A Qwen3-shaped model trained on the reasoning and tool-use demo keeps its chat template through merge and GGUF
export: the merged folder's tokenizer renders every training row (tools, reasoning, tool results, turns without
reasoning) to the ids training trained on, and the GGUF carries the same template.

One short training of a tiny random Qwen3 over the real Qwen3 tokenizer (npm), then ``kotune merge`` and
``kotune export``, through the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, npm_tokenizer, run_kotune

DEMO = ROOT / "data" / "ko-reasoning-tools-demo.jsonl"


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory):
    """(run folder, merged folder, GGUF file) of a 2-step run of a tiny Qwen3 on the demo rows."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from kotune.config_load import load_config

    root = tmp_path_factory.mktemp("qwen3-reasoning")
    tokenizer = AutoTokenizer.from_pretrained(npm_tokenizer("qwen3"))
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    settings = {
        "model.path": root / "base",
        "model.quantization": "none",
        "model.compute_dtype": "float32",
        "data.path": DEMO,
        "data.val_size": 0,
        "data.cutoff_len": 2048,
        "train.output_dir": root / "run",
        "train.max_steps": 2,
        "train.micro_batch_size": 4,
        "train.optimizer": "adamw_torch",
        "train.min_free_disk_gb": 0,
    }
    env = {"KOTUNE_CACHE": str(root / "cache")}
    config_file = root / "config.yaml"
    config_file.write_text(load_config(None, [f"{k}={v}" for k, v in settings.items()]).to_yaml(), encoding="utf-8")
    steps = (
        ["train", str(config_file)],
        ["merge", str(root / "run"), "--dtype", "fp32"],
        ["export", str(root / "run" / "merged"), "--format", "gguf", "--quant", "f32", "--out", str(root / "q.gguf")],
    )
    for argv in steps:
        result = run_kotune(argv, env)
        assert result.returncode == 0, (argv[0], result.stderr[-3000:])
    return root / "run", root / "run" / "merged", root / "q.gguf"


def test_the_merged_template_renders_the_trained_ids(qwen3_run):
    """Every demo row through the merged folder's own template (``tools=`` and all) is the row as training
    tokenized it: reasoning, tool calls and tool results included."""
    from transformers import AutoTokenizer

    from kotune.config_load import load_config
    from kotune.data.prepare import prepare

    run, merged, _ = qwen3_run
    tokenizer = AutoTokenizer.from_pretrained(merged)
    cfg = load_config(run / "kotune_config.yaml")
    trained = prepare(cfg.data, AutoTokenizer.from_pretrained(npm_tokenizer("qwen3"))).train
    rows = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines()]
    assert len(trained) == len(rows)
    kinds = set()
    for example in trained:
        row = rows[example.row]
        kinds |= {k for m in row["messages"] for k in ("reasoning_content", "tool_calls") if m.get(k)}
        kinds |= {"tools"} if row.get("tools") else set()
        own = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"))["input_ids"]
        assert example.input_ids == own[: len(example.input_ids)], example.row
    assert kinds == {"reasoning_content", "tool_calls", "tools"}, "the demo rows cover reasoning and tools"


def test_the_gguf_carries_the_same_template(qwen3_run):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    _, merged, gguf_file = qwen3_run
    field = GGUFReader(gguf_file).fields["tokenizer.chat_template"]
    assert bytes(field.parts[-1]).decode("utf-8") == AutoTokenizer.from_pretrained(merged).chat_template
