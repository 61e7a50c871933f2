"""The model a run trains, assembled in one place: tokenizer, 4-bit base, LoRA."""

from __future__ import annotations

import torch

from kotune import output
from kotune.config import Config
from kotune.model.load import load_base_model, load_tokenizer
from kotune.model.lora import attach_lora, parameter_counts


def load_for_training(cfg: Config, path: str, token_ids: list[int] = ()):
    """Tokenizer and LoRA-wrapped model for a run (``token_ids``: embedding rows trained too, see
    ``trainable_token_ids``); prints trainable / total parameters like the walkthrough."""
    tokenizer = load_tokenizer(path, cfg.model)
    torch.manual_seed(cfg.train.seed)  # LoRA A is drawn at random
    from transformers import AutoConfig

    from kotune import fast

    fast_path, _ = fast.wanted(cfg, AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code))
    model = attach_lora(load_base_model(path, cfg.model, fast_path), cfg.lora, token_ids)
    trainable, total = parameter_counts(model)
    output.info(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    return tokenizer, model
