"""LoRA on the base model: which modules (checked before the weights load), which embedding rows, the wrap."""

from __future__ import annotations

from pathlib import Path

import torch

from kotune.config import Config, ConfigError, LoraConfig
from kotune.model.load import peft_quietly


def check_target_modules(cfg: Config, path: str) -> None:
    """Fail before the weights load if a ``lora.target_modules`` name matches no module of the model.

    peft matches a name to a module whose full name is that name or ends in ``.NAME``; the model's modules are
    listed from its config on the meta device, which allocates nothing.
    """
    if cfg.lora.target_modules == "all-linear":
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    names = [name for name, _ in skeleton.named_modules()]
    unmatched = [t for t in cfg.lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"'lora.target_modules': {', '.join(unmatched)} match no module of {path}; its linear layers are "
            f"{', '.join(linear)} (or use all-linear)"
        )


def attach_lora(model, cfg: LoraConfig, token_ids: list[int] = ()):
    """LoRA on ``cfg.target_modules``; ``token_ids``: embedding rows (input and untied output) trained as well."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    trainable_tokens = None
    if token_ids:
        layers = {"embed_tokens": list(token_ids)}
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            layers["lm_head"] = list(token_ids)
        trainable_tokens = layers
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        trainable_token_indices=trainable_tokens,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with peft_quietly():
        return get_peft_model(model, peft_config)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as stored elements, like the walkthrough's printout."""
    from torch.distributed.tensor import DTensor

    from kotune.fast.nf4_tensor import NF4Tensor

    def stored(p) -> int:  # a sharded (FSDP) 4-bit weight counts as bitsandbytes stores it: two values a byte
        return p.numel() // 2 if isinstance(p.to_local() if isinstance(p, DTensor) else p, NF4Tensor) else p.numel()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(stored(p) for p in model.parameters())
    return trainable, total


def trainable_token_ids(cfg: LoraConfig, tokenizer, untrained: list[int]) -> list[int]:
    """``lora.trainable_tokens`` as ids: ``auto`` is the audit's ``untrained`` list; a token not in the vocabulary
    is a config error naming it."""
    from kotune.config import ConfigError

    if cfg.trainable_tokens == "auto":
        return list(untrained)
    vocab = tokenizer.get_vocab()
    missing = [t for t in cfg.trainable_tokens if t not in vocab]
    if missing:
        raise ConfigError(f"'lora.trainable_tokens': {missing} not in the tokenizer's vocabulary")
    return [vocab[t] for t in cfg.trainable_tokens]


def check_adapter_base(run_dir: str, model_path: str) -> None:
    """``model.adapter`` must come from a run on this very base: an adapter of another base in the same shapes loads
    without complaint and trains (and, for DPO, becomes the reference) on the wrong weights. The run's summary (or,
    for a checkpoint, its run's) records the base's ``hashing.model_identity``; a run without one is let through
    with a warning."""
    from kotune import output
    from kotune.hashing import model_identity
    from kotune.run_folder import read_summary

    folder = Path(run_dir)
    summary = read_summary(folder) or read_summary(folder.parent) or {}
    if "base" not in summary:
        output.warn(f"'model.adapter': {run_dir} records no base identity (an older or unfinished run); not checked")
        return
    if summary["base"] != model_identity(model_path):
        raise ConfigError(
            f"'model.adapter': {run_dir} was trained on another base than model.path {model_path} (config.json or "
            "weights differ); start from an adapter of this base, or set model.path to the base that run used"
        )


def load_start_adapter(model, run_dir: str) -> None:
    """Copy the adapter of the run in ``run_dir`` into ``model``'s LoRA weights (``model.adapter``: start a
    preference run from an SFT run). Every LoRA weight must be found with the same shape, or the settings differ."""
    from pathlib import Path

    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from kotune.config import ConfigError
    from kotune.run_folder import ADAPTER

    path = Path(run_dir) / ADAPTER
    if not path.is_file():
        raise ConfigError(f"'model.adapter': {path} not found; give a kotune run folder holding {ADAPTER}")
    state = load_file(path)
    ours = {n for n, _ in model.named_parameters() if "lora_" in n}
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # a shape mismatch: another rank or base
        raise ConfigError(f"'model.adapter': {path} does not fit lora.r / the base model: {exc}") from None
    missing = [n for n in getattr(result, "missing_keys", []) if n in ours]
    if missing or getattr(result, "unexpected_keys", []):
        raise ConfigError(
            f"'model.adapter': {path} holds other LoRA modules than lora.target_modules asks for "
            f"(missing {missing[:3]}, unexpected {list(getattr(result, 'unexpected_keys', []))[:3]}); "
            "use the SFT run's lora settings"
        )
