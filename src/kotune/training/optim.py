"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math
import warnings

import torch

from kotune.config import TrainConfig


def build_optimizer(model, cfg: TrainConfig, device: torch.device):
    """AdamW over the trainable parameters; bitsandbytes' 8-bit variants need CUDA, so CPU uses torch's."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.weight_decay}
    name = cfg.optimizer
    if name.endswith("8bit") and device.type != "cuda":
        warnings.warn(f"train.optimizer={name} needs CUDA; using adamw_torch on {device.type}", stacklevel=2)
        name = "adamw_torch"
    if name == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, **kwargs)


def skips_on_device(optimizer) -> bool:
    """Whether ``optimizer.step`` can be told on the device to skip an update (torch's fused AdamW reads a
    ``found_inf`` tensor, as under a gradient scaler), so deciding needs no host synchronisation."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule to zero.

    The same curve as transformers' ``get_cosine_schedule_with_warmup`` (which the walkthrough's Trainer uses),
    so losses can be compared step by step with the walkthrough's recipe.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return cfg.learning_rate
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.lr_scheduler == "linear":
        return cfg.learning_rate * max(0.0, 1.0 - progress)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
