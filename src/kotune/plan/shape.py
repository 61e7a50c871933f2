"""The sizes of a base model that memory and time depend on, read from its ``config.json`` (no weights loaded).

What differs by family is read here once: the width of the attention projections (``head_dim`` x heads, which is
not the hidden size in Gemma 3), q/k norm weights and extra norms per layer (Qwen3, Gemma 3, EXAONE 4), tied
embeddings, and which layers attend within a sliding window (Gemma 3, EXAONE 4 32B, Mistral).
"""

from __future__ import annotations

from dataclasses import dataclass

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QK_NORM = ("qwen3", "gemma3_text", "exaone4")
"""Model types with an RMS norm (one weight of ``head_dim``) on q and on k in every layer."""
NORMS_PER_LAYER = {"gemma3_text": 4}
"""Hidden-size norms per decoder layer where not two (Gemma 3: before and after attention and MLP)."""


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int = 0
    """Width of one attention head; 0: ``hidden // heads`` (Llama's rule, not Gemma 3's)."""
    qk_norm: bool = False
    norms_per_layer: int = 2
    sliding_layers: int = 0
    """Layers that attend within ``window`` tokens (the rest attend to the whole sequence)."""
    window: int | None = None

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each decoder layer's linear modules."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_width, self.kv_heads * self.head_width
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Weights of all decoder-layer linear modules (the ones quantized)."""
        return self.layers * sum(a * b for a, b in self.linear().values())

    def norm_params(self) -> int:
        """Weights of every norm (kept in 16 bits): the layers' hidden-size norms, q/k norms, the final norm."""
        qk = 2 * self.head_width if self.qk_norm else 0
        return self.layers * (self.norms_per_layer * self.hidden + qk) + self.hidden

    def lora_params(self, targets: list[str] | str, r: int) -> int:
        names = LINEAR if targets == "all-linear" else [t for t in targets if t in LINEAR]
        return self.layers * sum(r * (a + b) for n, (a, b) in self.linear().items() if n in names)


def shape_of(config) -> ModelShape:
    """The shape of a transformers ``PretrainedConfig`` (a multimodal one's text part)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    kind = getattr(config, "model_type", "")
    heads = config.num_attention_heads
    sliding, window = sliding_layers(config)
    return ModelShape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        head_dim=getattr(config, "head_dim", None) or 0,
        qk_norm=kind in QK_NORM,
        norms_per_layer=NORMS_PER_LAYER.get(kind, 2),
        sliding_layers=sliding,
        window=window,
    )


def sliding_layers(config) -> tuple[int, int | None]:
    """(layers that attend within a window, the window): from ``layer_types`` where the config has it, else every
    layer when a window is set and used (Qwen2 sets one it does not use unless ``use_sliding_window``)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return 0, None
    if types:
        count = sum(t == "sliding_attention" for t in types)
        return count, window if count else None
    if getattr(config, "model_type", "") == "qwen2" and not getattr(config, "use_sliding_window", False):
        return 0, None
    return config.num_hidden_layers, window


def read_shape(path: str) -> ModelShape:
    """The shape of the model at ``path`` (a folder, a hub name in the local cache, a ``.gguf`` or ``pypi:`` spec)."""
    from transformers import AutoConfig

    from kotune.model.assets import resolve_model

    return shape_of(AutoConfig.from_pretrained(resolve_model(path)))
