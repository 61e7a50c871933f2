"""kotune's fast GPU training path: the same loss and gradients as the plain path, in less time and memory.

Chosen by ``train.kernels`` (``auto``: on when CUDA is there and the model is one it computes exactly,
``off``: never). What it changes, and why each change keeps the maths, is in ``docs/fast-path.md``.
"""

from __future__ import annotations

import torch

from kotune.config import Config
from kotune.data.examples import IGNORE


def wanted(cfg: Config, model_config, device_type: str | None = None) -> tuple[bool, str]:
    """(use the fast path?, why) for this config and the base model's transformers config."""
    from kotune.fast.families import gpu_unchecked_reason, unsupported_reason

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.kernels == "off":
        return False, "train.kernels is off"
    if device_type != "cuda":
        return False, f"no CUDA device ({device_type})"
    if cfg.model.quantization == "8bit":
        return False, "8-bit weights"
    if cfg.lora.trainable_tokens:
        return False, "lora.trainable_tokens (embedding rows trained)"
    reason = unsupported_reason(model_config, cfg.lora.target_modules) or gpu_unchecked_reason(model_config)
    if reason:
        return False, reason
    return True, "CUDA and a supported model"


def build(peft_model, cfg: Config, **levers):
    """The :class:`~kotune.fast.decoder.FastCausalLM` computing ``peft_model``'s training loss.

    Every lever is on by default; ``levers`` (``offload``, ``fused``, ``host_embeddings``, ``triton_dequant``)
    turn one off, for the benchmark's ablations.
    """
    from kotune.fast.decoder import FastCausalLM

    # GRPO samples through kotune.fast.generation, which reads the table where it is, and computes its KL reference
    # (grpo.beta) on this model too (``training.objectives.reference_of``)
    options = {"offload": True, "fused": True, "host_embeddings": True, "triton_dequant": True, **levers}
    return FastCausalLM(
        peft_model,
        compute_dtype=cfg.model.torch_dtype(),
        checkpoint=cfg.model.gradient_checkpointing,
        **options,
    )


class HostSide:
    """What the fast forward reads on the host, taken from a batch before it moves to the GPU, so the forward
    never waits for the device to hand it back: the token ids (the embedding table lives in host memory), the
    packed rows' bounds, and the labelled positions the loss projects.

    A plain class on purpose: DDP moves tensors (and dataclasses of tensors) in a forward's arguments to the
    GPU, and these must stay where they are.
    """

    __slots__ = ("ids", "bounds", "keep")

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.ids = batch["input_ids"].reshape(-1)
        self.bounds = batch["cu_seqlens"].tolist() if "cu_seqlens" in batch else None
        self.keep = (batch["labels"][:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(1)


def with_host_side(batch: dict) -> dict:
    """``batch`` (still on the host) with its :class:`HostSide` under ``"host"``."""
    return {**batch, "host": HostSide(batch)}


def loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token loss through the fast model (or its DDP wrapper); the plain path's ``loss_sum`` twin."""
    return model(
        input_ids=batch["input_ids"],
        labels=batch["labels"],
        position_ids=batch.get("position_ids"),
        cu_seqlens=batch.get("cu_seqlens"),
        host=batch.get("host"),
    )
