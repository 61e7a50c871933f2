"""A randomly initialised model folder of a newer base's shape, with the anchor's word-level tokenizer.

    python bench/family_model.py qwen3-8b /tmp/qwen3-8b-rand

Shapes from the published configs (random weights do not change speed). The tokenizer is built as
``anchor_bench.py`` builds its own (each word ``t<id>`` one token, ids below 128,000), so ``bench/kotune_run.py``
and the anchor scripts run unchanged with ``--model-dir`` / ``--dir`` pointing here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "qwen3-8b": dict(
        model_type="qwen3",
        vocab_size=151_936,
        hidden_size=4096,
        intermediate_size=12_288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "gemma3-12b": dict(
        model_type="gemma3_text",
        vocab_size=262_208,
        hidden_size=3840,
        intermediate_size=15_360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        max_position_embeddings=131_072,
        rms_norm_eps=1e-6,
    ),
}


def word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128_000)}
    for i, special in enumerate(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]):
        vocab[special] = 128_000 + i
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", unk_token="t0"
    )


def build(shape: str, path: str) -> None:
    if (Path(path) / "config.json").exists():
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.time()
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=128000, eos_token_id=128001)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    word_level_tokenizer().save_pretrained(path)
    print(f"built {shape} in {time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2])
