"""The sizes of a base model that memory and time depend on, read from its ``config.json`` (no weights loaded)."""

from __future__ import annotations

from dataclasses import dataclass

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each decoder layer's linear modules."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Weights of all decoder-layer linear modules (the ones quantized)."""
        return self.layers * sum(a * b for a, b in self.linear().values())

    def lora_params(self, targets: list[str] | str, r: int) -> int:
        names = LINEAR if targets == "all-linear" else [t for t in targets if t in LINEAR]
        return self.layers * sum(r * (a + b) for n, (a, b) in self.linear().items() if n in names)


def shape_of(config) -> ModelShape:
    """The shape of a transformers ``PretrainedConfig`` (Llama, Mistral, Qwen2 and alike)."""
    heads = config.num_attention_heads
    return ModelShape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def read_shape(path: str) -> ModelShape:
    """The shape of the model at ``path`` (a folder, a hub name in the local cache, a ``.gguf`` or ``pypi:`` spec)."""
    from transformers import AutoConfig

    from kotune.model.assets import resolve_model

    return shape_of(AutoConfig.from_pretrained(resolve_model(path)))
