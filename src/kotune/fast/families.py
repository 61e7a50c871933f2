"""Which decoders the fast path computes exactly, and what each of their layers does, from configs alone.

Every family shares one layer (:class:`kotune.fast.decoder.DecoderLayer`): seven linear layers with LoRA,
grouped-query attention, a gated MLP, RMSNorms. They differ only in the options of :class:`LayerSpec`, read
here from the transformers config the way transformers' own modeling file reads it (5.17):

=============  ==============================================================================================
family         what its layers add to Llama's
=============  ==============================================================================================
llama          nothing; any rope scaling whose tables depend on positions alone
mistral        a sliding window on every layer when ``sliding_window`` is set
ministral      a sliding window on the layers ``layer_types`` marks ``sliding_attention``
qwen2          as ministral (``use_sliding_window``, ``max_window_layers``)
qwen3          as qwen2, plus RMSNorm of each query and key head before RoPE
gemma3_text    (1 + weight) RMSNorms in fp32, four per layer (around attention and MLP), q/k norms, GELU-tanh,
               ``query_pre_attn_scalar`` attention scale, embeddings times sqrt(hidden), local layers with a
               window and their own rotary base, global layers with theirs
gemma3         gemma3_text inside the multimodal model (text-only rows: the vision tower never runs)
exaone4        no norm before attention or MLP but one after each, q/k norms, local layers with a window and
               RoPE, global layers without RoPE (when a window is set)
=============  ==============================================================================================

What it cannot compute exactly, :func:`unsupported_reason` names; the plain path then runs.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

PRE_NORMS = ("input_layernorm", None, "post_attention_layernorm", None)
SANDWICH_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
POST_NORMS = (None, "post_attention_layernorm", None, "post_feedforward_layernorm")

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
"""transformers' activation names -> the fast path's (``torch.nn.functional.silu`` / ``gelu(approximate="tanh")``)."""

POSITIONAL_ROPE = ("default", "linear", "llama3", "yarn", "proportional")
"""Rope types whose tables are a function of each position alone (each checked by ``tests/test_fast_model.py``).
``dynamic`` and ``longrope`` recompute theirs from the largest position in the batch (and ``dynamic`` keeps state
between batches), so a packed row would not get the tables it gets alone: refused, as is any type not listed."""

SLIDING = "sliding_attention"


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer computes, as options of the Llama layer."""

    norms: tuple[str | None, str | None, str | None, str | None] = PRE_NORMS
    """Module names of the RMSNorms on (attention input, attention output, MLP input, MLP output); None: none."""
    gemma_norm: bool = False
    """RMSNorm as Gemma's: normalised in fp32, times (1 + weight) in fp32, cast back once."""
    qk_norm: bool = False
    """RMSNorm (``self_attn.q_norm`` / ``k_norm``) of every query and key head before RoPE."""
    window: int | None = None
    """Sliding window: a query sees the last ``window`` keys of its row, itself included."""
    rope: str | None = "default"
    """Which rotary table: ``"default"`` the model's one table, a layer type for per-type tables (Gemma 3), None:
    no position encoding in this layer."""
    activation: str = "silu"
    """Gate activation: ``silu`` or ``gelu_tanh``."""


@dataclass(frozen=True)
class Family:
    """What the fast path needs to know of a model beyond its layers."""

    layers: tuple[LayerSpec, ...]
    gemma_norm: bool = False
    """The final norm is Gemma's (1 + weight)."""
    embed_scale: bool = False
    """The embedding module multiplies its rows by its ``embed_scale`` (a forward that reads the table directly
    must do the same)."""


def text_config(config):
    """The decoder's config: the text config of a multimodal ``gemma3``, else ``config`` itself."""
    return config.text_config if getattr(config, "model_type", None) == "gemma3" else config


def _rope_types(config) -> set[str]:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in params or not params:
        return {params.get("rope_type", "default")}
    return {p.get("rope_type", "default") for p in params.values() if p}  # one dict per layer type (Gemma 3)


def _windows(config, every_layer: bool) -> list[int | None]:
    window = getattr(config, "sliding_window", None)
    if every_layer:
        return [window] * config.num_hidden_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [window if t == SLIDING else None for t in types]


def family(config) -> Family:
    """The :class:`Family` of a supported config (:func:`unsupported_reason` is None)."""
    kind = config.model_type
    config = text_config(config)
    act = ACTIVATIONS[getattr(config, "hidden_activation", None) or config.hidden_act]
    if kind in ("gemma3", "gemma3_text"):
        layers = tuple(
            LayerSpec(SANDWICH_NORMS, True, True, w, t, act)
            for w, t in zip(_windows(config, False), config.layer_types, strict=True)
        )
        return Family(layers, gemma_norm=True, embed_scale=True)
    windows = _windows(config, every_layer=kind == "mistral")
    if kind == "exaone4":
        # transformers: RoPE in every layer without a window, else in the sliding layers only
        nope = getattr(config, "sliding_window", None) is not None
        specs = (LayerSpec(POST_NORMS, False, True, w, None if nope and w is None else "default", act) for w in windows)
        return Family(tuple(specs))
    return Family(tuple(LayerSpec(qk_norm=kind == "qwen3", window=w, activation=act) for w in windows))


SUPPORTED = ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma3_text", "gemma3", "exaone4")


def _config_reason(config) -> str | None:
    """What in a supported family's (text) config the fast path cannot compute exactly."""
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        return f"activation {act!r} (the fast path knows {', '.join(ACTIVATIONS)})"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout"
    rope = sorted(_rope_types(config) - set(POSITIONAL_ROPE))
    if rope:
        known = rope[0] in ("dynamic", "longrope")
        return f"rope type {rope[0]!r} ({'its tables depend on the batch' if known else 'not checked'})"
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is not None:
            return f"{key} (not implemented)"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    types = getattr(config, "layer_types", None) or []
    if any(t not in ("full_attention", SLIDING) for t in types):
        return f"layer types {sorted(set(types))}"
    if SLIDING in types and getattr(config, "sliding_window", None) is None:
        return "sliding_attention layers without a sliding_window"
    return None


def unsupported_reason(config, lora_targets) -> str | None:
    """Why the fast path cannot compute this model exactly (None when it can), from configs alone."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} (the fast path knows {', '.join(SUPPORTED)})"
    reason = _config_reason(text_config(config))
    if reason:
        return reason
    targets = [lora_targets] if isinstance(lora_targets, str) else list(lora_targets)
    extra = [t for t in targets if t != "all-linear" and t not in ATTENTION + MLP]
    if extra:
        return f"LoRA targets outside the decoder's linear layers: {extra}"
    return None


GPU_CHECKED = ("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma3_text", "gemma3", "exaone4")
"""Families whose fast path has passed its GPU tests (bf16 on 4-bit bases, the Liger and flash kernels, sliding
windows in the flash kernel; ``bench/RESULTS.md``). A family exact in the CPU parity tests whose GPU kernels have
not run on a GPU takes the plain path on CUDA until they have (every family in ``SUPPORTED`` has, since the
multimodal ``gemma3`` wrapper's tests passed on 2026-12-06)."""


def gpu_unchecked_reason(config) -> str | None:
    """Why the fast path, exact for this model on the CPU, is not used on CUDA yet (None when its GPU tests ran)."""
    kind = getattr(config, "model_type", None)
    if kind not in GPU_CHECKED:
        return f"model type {kind!r}: exact in the CPU tests, its GPU kernels not yet checked on a GPU"
    return None
