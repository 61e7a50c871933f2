"""The model a run trains, assembled once: 4-bit base, LoRA, and the fast or the plain path computing its loss.

The fast path (``kotune.fast``) is chosen here, once, from the config, the base model's config and the device
the model loads on (``model.load.device_map``: this process's GPU when there is one); training only uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from kotune import fast, output
from kotune.config import Config
from kotune.data.examples import IGNORE
from kotune.model.load import load_base_model
from kotune.model.lora import attach_lora, parameter_counts
from kotune.model.sharded_load import load_sharded
from kotune.training import dist
from kotune.training.fsdp import CannotShard, LayerSharding, held_bytes


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions, in float32 (the plain path)."""
    if "cu_seqlens" in batch:
        # packed rows (collate_packed): with no attention mask and no cache, transformers finds the rows where
        # their positions restart and makes each layer type's mask block-diagonal (a mask given here would replace
        # every layer's, sliding windows included)
        ids, positions = batch["input_ids"], batch["position_ids"]
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    keep = labels != IGNORE
    return torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")


@dataclass
class TrainingModel:
    """What a run trains: the LoRA model, and the module and function that compute its summed loss."""

    peft: Any
    """The base with LoRA (peft): its adapter is what the optimizer updates, checkpoints hold and the run saves."""
    fast: Any | None
    """The fast-path model (``kotune.fast``) computing ``peft``'s loss with the same weights, or None (plain)."""

    @property
    def forward(self) -> torch.nn.Module:
        """The module a training step calls: the fast model, else the peft model."""
        return self.fast if self.fast is not None else self.peft

    def host_side(self, batch: dict) -> dict:
        """``batch`` as the training step hands it over, still on the host (the fast path takes what it will
        read on the host out of it first: ``kotune.fast.HostSide``)."""
        return fast.with_host_side(batch) if self.fast is not None else batch

    @property
    def loss_sum(self):
        """``loss_sum(forward, batch)``: the summed next-token loss of a batch on this path."""
        return fast.loss_sum if self.fast is not None else loss_sum


def fast_or_plain(cfg: Config, path: str) -> tuple[bool, str]:
    """(use the fast path?, why), decided once for the run before its weights load."""
    from transformers import AutoConfig

    device_type = "cuda" if torch.cuda.is_available() else "cpu"  # where device_map puts the whole model
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    return fast.wanted(cfg, model_config, device_type)


UNSHARDED_FAMILIES = ("gemma3", "gemma3_text")
"""Fast-path families ``model.sharded_load`` cannot build: Gemma 3's embedding scale is a buffer no file holds
(left on the meta device), and the multimodal model keeps its decoder under ``model.language_model``."""


def refuse_unsharded_recipe(cfg: Config, path: str) -> str:
    """Why FSDP can train this run (it always runs the fast path's forward, on any device), or CannotShard."""
    from transformers import AutoConfig

    from kotune.fast.families import gpu_unchecked_reason, unsupported_reason

    model_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    reason = unsupported_reason(model_config, cfg.lora.target_modules)
    if reason is None and torch.cuda.is_available():
        reason = gpu_unchecked_reason(model_config)
    if reason is None and model_config.model_type in UNSHARDED_FAMILIES:
        reason = f"model type {model_config.model_type!r} (the layer-at-a-time loader does not read it yet)"
    if reason is None and cfg.model.quantization != "4bit":
        reason = f"model.quantization {cfg.model.quantization} (FSDP shards 4-bit weights: set 4bit)"
    if reason is None and not cfg.model.gradient_checkpointing:
        reason = "model.gradient_checkpointing off (a layer's weights are gathered again for its recomputation)"
    if reason is None and cfg.lora.trainable_tokens:
        reason = "lora.trainable_tokens"
    if reason is None and cfg.train.eval_generate:
        reason = "train.eval_generate (generation runs on the first process alone)"
    if reason:
        raise CannotShard(f"train.distributed fsdp cannot train this run: {reason}")
    return "train.distributed fsdp"


def load_for_training(cfg: Config, path: str, token_ids: list[int] = ()) -> TrainingModel:
    """The LoRA-wrapped model for a run (``token_ids``: embedding rows trained too, see
    ``model.lora.trainable_token_ids``) on the path ``fast_or_plain`` picks; prints trainable / total parameters
    like the walkthrough."""
    torch.manual_seed(cfg.train.seed)  # LoRA A is drawn at random
    lora = cfg.lora
    if cfg.train.objective == "grpo" and lora.dropout:
        # the sampler and the KL reference run without dropout: with it in the training forward, the ratio and the
        # KL would compare two different functions from the first step on (TRL's GRPOConfig.disable_dropout)
        output.info(f"kotune: GRPO trains without LoRA dropout (lora.dropout {lora.dropout:g} not applied)")
        lora = replace(lora, dropout=0.0)
    sharded = dist.is_distributed() and cfg.train.distributed == "fsdp"
    use_fast, why = fast_or_plain(cfg, path)
    if sharded:  # read a layer at a time into its shards: the base is never whole on a GPU
        use_fast, why = True, refuse_unsharded_recipe(cfg, path)
        model = load_sharded(path, cfg, lambda base: attach_lora(base, lora, token_ids), LayerSharding())
        world = dist.rank_and_world()[1]
        output.info(f"kotune: FSDP over {world} processes: each holds {held_bytes(model) / 2**30:.2f} GiB of the "
                    "base's decoder weights (its shard), a layer gathered in 4 bits at a time")  # fmt: skip
    else:
        model = attach_lora(load_base_model(path, cfg.model, use_fast), lora, token_ids)
    trainable, total = parameter_counts(model)
    share = 100 * trainable / total
    output.info(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")
    if cfg.train.kernels != "off":
        output.info(f"kotune: fast path {'on' if use_fast else 'off'} ({why})")
    return TrainingModel(model, fast.build(model, cfg) if use_fast else None)
