"""Peak GPU memory and time of a run, from its config, its base model's shape and its rows' real token counts.

The memory model is arithmetic where the bytes are known (4-bit weights with their quantization constants, 16-bit
weights, LoRA weights with their gradients and optimizer state) and fitted where they depend on kernels:

    peak = weights + LoRA state + OMEGA x (largest linear weight in bf16) + KAPPA x 2(4 hidden + 3 intermediate) x T

with T the tokens of the longest pass (a packed sequence, or a padded micro-batch) the run will make: on the fast
path the layer inputs wait in host memory, so the GPU holds one layer's recomputed activations at a time and the
peak grows with the pass, not with the depth. A fast pass longer than ``kotune.fast.tiled.TILE_FROM`` tokens runs
its MLPs in slices, and its activations are KAPPA_LONG x 2 hidden x T instead.

Step time is a sum over the step's passes of

    max(LAUNCH x layers, (A x linear FLOPs + B x attention FLOPs) / GPU peak + C)

(a pass is either bound by the host launching kernels or by the matrix products). OMEGA, KAPPA, A, B, C and LAUNCH
were fitted by ``bench/fit_plan.py`` to kotune's own runs (``bench/RESULTS.md``, "kotune plan"): one H200, the
Llama-3-8B shape, fast path. Other shapes and GPUs are extrapolations of that fit, and the plain path (no fast
kernels: CPU, 8-bit weights, unsupported models) is arithmetic only; ``Plan.basis`` says which applies.

GRPO adds the sampling of completions, ``DECODE x layers x max_new_tokens`` a step, on the steps that sample: the
first of each group of ``grpo.iterations`` steps, whose others train again on the same completions. DECODE is one
measured point, not a fit.

Families differ in what ``plan.shape`` reads: the projections' width (heads x head_dim), q/k norm weights and extra
norms, tied embeddings (one table on the GPU, shared with the output layer), and the vocabulary, whose logits the
plain path holds whole (Gemma 3's 262k tokens make them the largest part of a long pass). Sliding-window layers are
costed as full attention, in memory and time alike (``window_note`` says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kotune.config import Config
from kotune.plan.gpus import GiB, Gpu
from kotune.plan.shape import ModelShape

MEASURED_ON = "H200"
OMEGA = 1.473
"""Workspace: dequantized weights in flight, the loss kernel's logits chunk, cuBLAS workspace."""
KAPPA = 1.837
"""Activation bytes per token of a pass, in units of 2 (4 hidden + 3 intermediate) bytes."""
KAPPA_LONG = 15.11
"""The same for a pass long enough that the fast path runs its MLPs in slices (``kotune.fast.tiled``), in units of
2 x hidden bytes: no intermediate-sized tensor grows with the pass any more. Fitted on one H100, Llama-3-8B shape,
one sequence of 24,576 to 163,840 tokens (``bench/long_context.py``; ``bench/RESULTS.md``, "The longest sequence")."""
A, B, C = 1.89, 2.45, 0.042
"""Inverse efficiency of the linear and attention products on the fast path, and a pass's fixed GPU time (s)."""
LAUNCH = 0.0122
"""Host time to launch one decoder layer's kernels for a pass (forward, recompute, backward), seconds."""
DECODE = 0.000642
"""GRPO sampling: seconds a decoder layer takes a decode step (one new token of every completion of a step), the
prefill and the rewards included. One measurement, through ``kotune.fast.generation``: 64 completions of 128 tokens
in 2.63 s (3,117 generated tokens/s) on one H100, Llama-3-8B shape in NF4 (``bench/RESULTS.md``, "Rollouts on the
fast path", call 3): 2.63 / (128 x 32). Not scaled by the GPU or the batch (one point)."""
MARGIN = 0.08
"""Share of the GPU's memory kept free for the caching allocator's fragmentation and the CUDA context."""

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Per weight: a 4-bit code, an 8-bit absmax per block of 64 (double quant), an fp32 constant per 256 blocks."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
OPTIMIZER_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "adamw_fused": 8, "adamw_torch": 8}
"""Optimizer state per LoRA weight (two moments)."""


@dataclass
class Pass:
    step: int
    rows: list[int]
    """Row indices (into the training rows) of this pass."""
    tokens: int
    """Tokens the pass computes, padding included."""
    square: int
    """Sum over its rows of (padded) length squared: the attention work."""


@dataclass
class Plan:
    parts: dict[str, int]
    """Bytes of each part of the peak, in the order they are shown."""
    longest: Pass
    steps: int
    step_seconds: float
    """Mean over the run's steps."""
    run_seconds: float
    """Training and, for GRPO, sampling (``sample_seconds``)."""
    gpu: Gpu
    fast: bool
    passes: list[Pass] = field(default_factory=list)
    """Every pass of the run on the first process, in order."""
    world: int = 1
    notes: list[str] = field(default_factory=list)
    sample_seconds: float = 0.0
    """Of ``run_seconds``, GRPO's sampling of completions."""

    @property
    def peak_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu.memory_bytes * (1 - MARGIN))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    @property
    def basis(self) -> str:
        if not self.fast:
            return "plain path: arithmetic only, not fitted to measured runs"
        basis = f"fast path, fitted on an {MEASURED_ON} with the Llama-3-8B shape (other shapes extrapolate it)"
        if self.gpu.name.upper().replace("NVIDIA ", "") != MEASURED_ON:
            basis += f"; time scaled from the {MEASURED_ON} by peak throughput"
        return basis


def run_passes(lengths: list[int], cfg: Config, world: int = 1, rank: int = 0, packed: bool = True) -> list[Pass]:
    """Every pass process ``rank`` makes in the run, in order: ``data.order.step_passes``, step by step."""
    from kotune.data.order import Epochs, step_passes, step_start, total_steps

    t = cfg.train
    steps, _ = total_steps(cfg, lengths, world)
    epochs = Epochs(lengths, cfg)
    out: list[Pass] = []
    for step in range(steps):
        for group in step_passes(epochs, step_start(cfg, step), rank, world, packed):
            if t.objective == "grpo":  # each prompt's completions, padded to the longest prompt + max_new_tokens
                sequences, length = len(group) * cfg.grpo.generations, generation_length(lengths, group, cfg)
                out.append(Pass(step, group, sequences * length, sequences * length**2))
                continue
            if packed:
                out.append(Pass(step, group, sum(lengths[i] for i in group), sum(lengths[i] ** 2 for i in group)))
                continue
            multiple = t.pad_to_multiple_of
            padded = -(-max(lengths[i] for i in group) // multiple) * multiple
            out.append(Pass(step, group, padded * len(group), padded**2 * len(group)))
    return out


def generation_length(lengths: list[int], group: list[int], cfg: Config) -> int:
    """GRPO: the length a pass's sequences are sampled and trained at, its longest prompt + max_new_tokens."""
    return max(lengths[i] for i in group) + cfg.grpo.max_new_tokens


def kv_cache_bytes(shape: ModelShape, cfg: Config, sequences: int, length: int) -> int:
    """The KV cache of a generation batch: keys and values of every layer, ``sequences`` x ``length`` tokens."""
    return (
        2 * shape.layers * shape.kv_heads * shape.head_width * sequences * length * DTYPE_BYTES[cfg.model.compute_dtype]
    )


def memory_parts(shape: ModelShape, cfg: Config, tokens: int, fast: bool, shards: int = 1) -> dict[str, int]:
    """Bytes of the peak's parts for a pass of ``tokens`` tokens, the base split in ``shards`` (FSDP)."""
    m = cfg.model
    dtype = DTYPE_BYTES[m.compute_dtype]
    quantized = {"4bit": NF4_BYTES, "8bit": 1.0 + 4 / 4096, "none": dtype}[m.quantization]
    embedding = shape.vocab * shape.hidden * dtype
    sixteen = (0 if shape.tied_embeddings else embedding) + shape.norm_params() * dtype
    if not fast or shape.tied_embeddings:
        sixteen += embedding  # the fast path keeps an untied input embedding table in host memory
    lora = shape.lora_params(cfg.lora.target_modules, cfg.lora.r)
    largest = max(a * b for a, b in shape.linear().values()) * 2
    activations = KAPPA * 2 * (4 * shape.hidden + 3 * shape.intermediate) * tokens
    if fast and tokens > tile_from():
        activations = KAPPA_LONG * 2 * shape.hidden * tokens
    base = shape.linear_params() * quantized
    parts = {f"base weights ({m.quantization})": int(base)}
    if shards > 1:  # its shard, and the layer being computed and the next one gathered whole
        parts = {
            f"base weights ({m.quantization}), 1/{shards} shard": int(base / shards),
            "gathered layers (FSDP)": int(2 * base / shape.layers),
        }
    parts |= {
        "unquantized weights (lm_head, embeddings on GPU, norms)": sixteen,
        f"LoRA ({lora / 1e6:.1f}M): weights, gradients, optimizer": lora
        * (4 + 4 + OPTIMIZER_BYTES[cfg.train.optimizer]),
        "workspace (dequantized weights, loss chunks)": int(OMEGA * largest),
        f"activations (longest pass, {tokens:,} tokens)": int(activations),
    }
    # transformers' checkpointing keeps every layer's input and the whole pass's logits on the GPU: tokens x vocab
    # of them, which for Gemma 3's 262k vocabulary outweighs the activations of a long pass
    if not fast:
        parts[f"activations (longest pass, {tokens:,} tokens)"] += shape.layers * tokens * shape.hidden * dtype
        parts["logits (bf16, fp32 copy, gradient)"] = tokens * shape.vocab * (dtype + 4 + 4)
    return parts


def tile_from() -> int:
    """Tokens above which a fast pass runs its MLPs in slices."""
    from kotune.fast.tiled import TILE_FROM

    return TILE_FROM


def longest_sequence(shape: ModelShape, cfg: Config, gpu: Gpu, fast: bool, shards: int = 1) -> int:
    """The most tokens one sequence (one row a pass) may have for the plan's peak to stay within the budget, to
    within 256 (0: not even the weights fit).

    The peak grows with the tokens except where a fast pass starts slicing its MLP (past ``tile_from()``): there it
    drops, so a budget between the two levels fits longer sequences but not the edge. Each side is bisected alone.
    """
    budget = gpu.memory_bytes * (1 - MARGIN)

    def fits(tokens: int) -> bool:
        return sum(memory_parts(shape, cfg, tokens, fast, shards).values()) <= budget

    sliced = longest_fitting(fits, tile_from() + 1, 1 << 24)
    if sliced is not None:
        return sliced
    return longest_fitting(fits, 0, tile_from()) or 0  # None: not even the weights fit


def longest_fitting(fits: Callable[[int], bool], low: int, high: int, step: int = 256) -> int | None:
    """The largest n in [low, high] with ``fits(n)``, to within ``step``, for a ``fits`` that holds up to some n
    and not beyond it; None when not even ``low`` fits."""
    if not fits(low):
        return None
    if fits(high):
        return high
    while high - low > step:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def host_bytes(shape: ModelShape, cfg: Config, tokens: int) -> int:
    """Pinned host memory the fast path parks a pass's layer inputs in (one hidden-sized row a token a layer)."""
    return shape.layers * tokens * shape.hidden * DTYPE_BYTES[cfg.model.compute_dtype]


def sampling_pass(cfg: Config, p: Pass) -> bool:
    """Whether GRPO samples pass ``p``'s completions: on the first step of each group of ``grpo.iterations``, as
    ``training.grpo.GrpoObjective.start_step`` does; the group's other steps train on the same completions."""
    return cfg.train.objective == "grpo" and p.step % cfg.grpo.iterations == 0


def sample_seconds(shape: ModelShape, cfg: Config) -> float:
    """GRPO: the time to sample a step's completions (all its passes' together), as if none stopped before
    ``max_new_tokens`` (sampling stops when all have): one decode step a new token (``DECODE``)."""
    return DECODE * shape.layers * cfg.grpo.max_new_tokens


def pass_seconds(shape: ModelShape, cfg: Config, p: Pass, gpu: Gpu) -> float:
    lora = shape.lora_params(cfg.lora.target_modules, cfg.lora.r)
    # forward, recomputed forward and the input-gradient backward of every frozen product; LoRA's are small
    linear_flops = 6 * (shape.linear_params() + lora) * p.tokens + 4 * shape.vocab * shape.hidden * p.tokens
    # causal QK^T and PV, forward + recompute + backward, over the heads' full width
    attention_flops = 8 * shape.heads * shape.head_width * shape.layers * p.square
    compute = (A * linear_flops + B * attention_flops) / (gpu.bf16_tflops * 1e12) + C
    return max(LAUNCH * shape.layers, compute)


def estimate(shape: ModelShape, cfg: Config, lengths: list[int], gpu: Gpu, fast: bool, world: int = 1) -> Plan:
    """The plan of a run of ``cfg`` over rows of these token ``lengths`` on ``world`` processes of ``gpu``."""
    from kotune.data.order import feeds_packed

    passes = run_passes(lengths, cfg, world, 0, feeds_packed(cfg.train, fast))
    longest = max(passes, key=lambda p: p.tokens)
    sampling_steps = sorted({p.step for p in passes if sampling_pass(cfg, p)})  # a step samples its passes at once
    sampling = sample_seconds(shape, cfg) * len(sampling_steps)
    seconds = sum(pass_seconds(shape, cfg, p, gpu) for p in passes) + sampling
    steps = passes[-1].step + 1
    shards = world if cfg.train.distributed == "fsdp" else 1
    parts = memory_parts(shape, cfg, longest.tokens, fast, shards)
    if cfg.train.objective == "grpo":  # sampling holds the cache of the step's completions beside the weights
        rows = max(([r for p in passes if p.step == s for r in p.rows] for s in sampling_steps), key=len)
        sequences = len(rows) * cfg.grpo.generations
        length = generation_length(lengths, rows, cfg)
        parts[f"KV cache (generating {sequences} sequences of up to {length:,} tokens)"] = kv_cache_bytes(
            shape, cfg, sequences, length
        )
    plan = Plan(parts, longest, steps, seconds / steps, seconds, gpu, fast)
    plan.passes, plan.world, plan.sample_seconds = passes, world, sampling
    if sampling:
        plan.notes.append(sampling_note(cfg, sampling))
    longest_fit = longest_sequence(shape, cfg, gpu, fast, shards)
    host = f"; its layer inputs need {gib(host_bytes(shape, cfg, longest_fit))} of host memory" if fast else ""
    plan.notes.append(f"the longest single sequence this plan fits: {longest_fit:,} tokens (one row a pass{host})")
    parked = host_bytes(shape, cfg, longest.tokens)
    if fast and parked >= GiB:  # the fast path parks layer inputs in host memory: a long pass needs much of it
        plan.notes.append(f"host memory: the longest pass's layer inputs wait in {gib(parked)} of pinned host memory")
    if shape.sliding_layers:
        plan.notes.append(window_note(shape))
    if shards > 1:
        plan.notes.append(f"per process of {world} (FSDP: each holds 1/{world} of the base; the step's rows are split)")
    elif world > 1:
        plan.notes.append(f"per process of {world} (DDP: each holds the whole base model; the step's rows are split)")
    return plan


def sampling_note(cfg: Config, seconds: float) -> str:
    """What the time holds of GRPO's sampling, and on what it rests."""
    every = f"every {cfg.grpo.iterations} steps" if cfg.grpo.iterations > 1 else "every step"
    return (
        f"of the time, {duration(seconds)} samples completions ({every}, each to grpo.max_new_tokens; measured at "
        "the Llama-3-8B shape on an H100 through the fast generator, one point, not scaled to other GPUs)"
    )


def window_note(shape: ModelShape) -> str:
    """What the plan assumes of sliding-window layers: no saving. The attention kernels kotune runs keep memory
    linear in the tokens whatever the window, and the masked ones (SDPA with a mask) compute the masked blocks."""
    return (
        f"{shape.sliding_layers} of {shape.layers} layers attend within {shape.window} tokens: costed as full "
        "causal attention (no memory to save: attention memory is linear in tokens in the kernels used)"
    )


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def render(plan: Plan) -> list[str]:
    """The plan as lines for the terminal: the parts, the verdict, the time."""
    lines = [f"kotune: plan for {plan.gpu.name} ({gib(plan.gpu.memory_bytes)}), {plan.basis}:"]
    width = max(len(k) for k in plan.parts)
    lines += [f"  {name:<{width}}  {gib(size):>10}" for name, size in plan.parts.items()]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"  {'predicted peak':<{width}}  {gib(plan.peak_bytes):>10}  ({verdict}: budget {gib(plan.budget_bytes)})"
    )
    p = plan.longest
    lines.append(f"  longest pass: step {p.step + 1}, {len(p.rows)} row(s), {p.tokens:,} tokens")
    run = duration(plan.run_seconds)
    lines.append(f"  time: {plan.steps} steps x {plan.step_seconds:.2f} s = {run} (model loading not included)")
    lines += [f"  {note}" for note in plan.notes]
    return lines
