"""The plan at the start of ``kotune train``: print it, pick settings that fit (``--fit``), stop a run that would not.

All of it runs on the tokenized rows, before the model loads, so an out-of-memory an hour in becomes an error
naming the rows and the setting to change in the first seconds.
"""

from __future__ import annotations

import os
from dataclasses import replace

from kotune.config import Config
from kotune.errors import KotuneError
from kotune.plan.estimate import Plan, estimate, gib, host_bytes, render
from kotune.plan.gpus import Gpu
from kotune.plan.packing_advice import packing_advice
from kotune.plan.shape import ModelShape, shape_of
from kotune.presets import Preset


class WouldNotFit(KotuneError, RuntimeError):
    """The plan predicts the run's longest pass does not fit the GPU; the message says what to change."""

    refusal = True


def plan_for(cfg: Config, model_path: str, lengths: list[int], gpu: Gpu, world: int = 1) -> tuple[Plan, ModelShape]:
    """The plan of ``cfg`` on ``world`` processes of ``gpu``, fast path or not as training would choose on CUDA."""
    from transformers import AutoConfig

    from kotune import fast

    model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    use_fast, _ = fast.wanted(cfg, model_config, "cuda")
    shape = shape_of(model_config)
    return estimate(shape, cfg, lengths, gpu, use_fast, world), shape


def plan_preset(preset: Preset, cfg: Config, gpu: Gpu) -> Plan:
    """The plan of a preset's recipe on ``gpu`` with no hub and no data: the base's shape from the preset, and one
    step whose rows are all ``data.cutoff_len`` tokens long (the largest passes the recipe can make)."""
    from kotune import fast

    model_config = preset.model_config()
    use_fast, _ = fast.wanted(cfg, model_config, "cuda")
    rows = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps
    plan = estimate(shape_of(model_config), cfg, [cfg.data.cutoff_len] * rows, gpu, use_fast)
    plan.notes.append(f"preset {preset.name}: every row {cfg.data.cutoff_len} tokens (no data read); time is one step")
    return plan


def fit_settings(cfg: Config, shape: ModelShape, lengths: list[int], gpu: Gpu, fast: bool, world: int = 1) -> Config:
    """The config with the largest ``train.micro_batch_size`` that fits, rows per step unchanged (a divisor of
    them); if not even one row a pass fits, the largest ``data.cutoff_len`` (halving) that does."""
    t = cfg.train
    rows = t.micro_batch_size * t.gradient_accumulation_steps
    for micro in sorted((m for m in range(1, rows + 1) if rows % m == 0), reverse=True):
        candidate = replace(cfg, train=replace(t, micro_batch_size=micro, gradient_accumulation_steps=rows // micro))
        if estimate(shape, candidate, lengths, gpu, fast, world).fits:
            return candidate
    cutoff = cfg.data.cutoff_len
    one_row = replace(cfg, train=replace(t, micro_batch_size=1, gradient_accumulation_steps=rows))
    while cutoff > 256:
        cutoff //= 2
        candidate = replace(one_row, data=replace(cfg.data, cutoff_len=cutoff))
        if estimate(shape, candidate, [min(n, cutoff) for n in lengths], gpu, fast, world).fits:
            return candidate
    least = estimate(shape, one_row, lengths, gpu, fast, world)
    raise WouldNotFit(
        f"no micro-batch size or data.cutoff_len >= 256 fits {gpu.name}: one row a pass needs {gib(least.peak_bytes)} "
        f"of a {gib(least.budget_bytes)} budget ({', '.join(f'{k} {gib(v)}' for k, v in least.parts.items())})"
    )


def choose_distributed(cfg: Config, model_path: str, lengths: list[int], gpu: Gpu | None, world: int) -> Config:
    """``train.distributed: auto`` made concrete for ``world`` processes: ddp when the plan of a DDP run fits
    each GPU (and on the CPU, where there is no ceiling to predict), else fsdp."""
    if cfg.train.distributed != "auto" or world == 1:
        return cfg
    ddp = replace(cfg, train=replace(cfg.train, distributed="ddp"))
    if gpu is None or plan_for(ddp, model_path, lengths, gpu, world)[0].fits:
        return ddp
    return replace(cfg, train=replace(cfg.train, distributed="fsdp"))


def refusal(plan: Plan, cfg: Config) -> str:
    p = plan.longest
    rows = ", ".join(str(i) for i in p.rows[:8]) + (", ..." if len(p.rows) > 8 else "")
    t = cfg.train
    change = (
        f"train.micro_batch_size={max(1, t.micro_batch_size // 2)} "
        f"train.gradient_accumulation_steps={t.gradient_accumulation_steps * 2}"
        if t.micro_batch_size > 1
        else f"data.cutoff_len={cfg.data.cutoff_len // 2} (longer rows are cut)"
    )
    return (
        f"predicted peak {gib(plan.peak_bytes)} does not fit {plan.gpu.name} (budget {gib(plan.budget_bytes)}): "
        f"the longest pass, step {p.step + 1}, holds {p.tokens:,} tokens (training rows {rows}). "
        f"Try {change}, or `kotune train --fit` to choose the settings, or --force to try anyway"
    )


HOST_SHARE = 0.9
"""Of the host memory available, what a run's parked layer inputs may take: the process needs the rest (13 GB of
host memory beside 84 GiB of inputs, measured at 8B and 344,064 tokens; ``bench/RESULTS.md``)."""


def available_host_bytes() -> int | None:
    """The host memory available to new allocations (Linux's ``MemAvailable``); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_refusal(plan: Plan, shape: ModelShape, cfg: Config, available: int | None, processes: int) -> str | None:
    """Why the fast path's longest pass would not fit the host's memory, or None. With gradient checkpointing it
    parks every layer's input in pinned host memory (``kotune.fast.checkpoint``), each of this host's
    ``processes`` its own; past what the host has, the kernel's out-of-memory killer ends the run, no message."""
    if not (plan.fast and cfg.model.gradient_checkpointing) or available is None:
        return None
    parked = host_bytes(shape, cfg, plan.longest.tokens) * processes
    if parked <= HOST_SHARE * available:
        return None
    p, each = plan.longest, f" ({processes} processes, each its own)" if processes > 1 else ""
    return (
        f"the longest pass, step {p.step + 1}, {p.tokens:,} tokens, parks {gib(parked)} of layer inputs in pinned host "
        f"memory{each}, and this machine has {gib(available)} available: the host would stop the run. Try "
        f"data.cutoff_len={cfg.data.cutoff_len // 2} (longer rows are cut) or fewer tokens a pass, or --force"
    )


def check_before_loading(
    cfg: Config, model_path: str, lengths: list[int], world: int, force: bool, fit: bool, log
) -> Config:
    """On CUDA: with ``fit``, the config with settings that fit (``fit_settings``); log the plan for this GPU and
    refuse a run predicted not to fit (unless ``force``). Returns the config to train with."""
    from kotune.plan.gpus import present_gpu

    gpu = present_gpu()
    cfg = choose_distributed(cfg, model_path, lengths, gpu, world)
    if gpu is None:  # the CPU has no memory ceiling kotune can predict
        if fit:
            log("kotune: --fit: no CUDA GPU here, the settings stay as configured")
        if advice := packing_advice(cfg, lengths, world):
            log(advice)
        return cfg
    plan, shape = plan_for(cfg, model_path, lengths, gpu, world)
    if fit:
        fitted = fit_settings(cfg, shape, lengths, gpu, plan.fast, world)
        if fitted.data.cutoff_len != cfg.data.cutoff_len:  # the rows would have to be tokenized again
            raise WouldNotFit(
                f"even one row a pass does not fit {gpu.name} at data.cutoff_len={cfg.data.cutoff_len}; "
                f"set data.cutoff_len={fitted.data.cutoff_len} (longer rows are cut: `kotune data audit` counts them)"
            )
        t = fitted.train
        log(f"kotune: --fit: train.micro_batch_size={t.micro_batch_size} train.gradient_accumulation_steps="
            f"{t.gradient_accumulation_steps} (rows per step unchanged)")  # fmt: skip
        cfg = fitted
        plan, _ = plan_for(cfg, model_path, lengths, gpu, world)
    for line in render(plan):
        log(line)
    if not plan.fits and not force:
        raise WouldNotFit(refusal(plan, cfg))
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun's processes on this host
    if not force and (why := host_refusal(plan, shape, cfg, available_host_bytes(), processes)):
        raise WouldNotFit(why)
    if advice := packing_advice(cfg, lengths, world, plan, shape):
        log(advice)
    return cfg
