"""What a GGUF says of a model's architecture: llama.cpp's architecture name, its hyperparameter keys, the rotary
embedding (with the scalings llama.cpp computes as transformers does), and every weight under its GGUF name.

Names and layouts follow llama.cpp's ``convert_hf_to_gguf.py`` through the ``gguf`` library's keys and tensor-name
maps. Llama-family q and k projections are permuted from Hugging Face's rotary layout (the two halves of each head
apart) to llama.cpp's (the pairs interleaved); Qwen2 and Qwen3 use Hugging Face's layout and are written as they
are. Llama 3.1+'s ``llama3`` rope scaling is written as llama.cpp's ``rope_freqs`` tensor (each rotary frequency's
divisor), taken from transformers' own rope functions, so the two cannot disagree; ``linear`` scaling is a key.

Gemma 3 stores its norms as the offset from 1 (its RMSNorm multiplies by ``1 + weight``); llama.cpp's multiply by
the weight, so 1 is added to each. llama.cpp fixes what the config states of Gemma 3's attention (every sixth layer
global, local layers' rope base 10,000, the query scale): a config that differs is refused, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kotune.export.gguf_tokenizer import ExportError


@dataclass(frozen=True)
class Architecture:
    gguf_name: str
    """``general.architecture`` and the prefix of its hyperparameter keys."""
    permute_qk: bool
    """True when llama.cpp expects q / k rows interleaved per rotary pair (its ``llama`` architecture)."""
    norm_shift: float = 0.0
    """Added to every norm weight (Gemma 3: 1, its norms multiply by ``1 + weight``)."""


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", permute_qk=True),
    "Qwen2ForCausalLM": Architecture("qwen2", permute_qk=False),
    "Qwen3ForCausalLM": Architecture("qwen3", permute_qk=False),
    "Gemma3ForCausalLM": Architecture("gemma3", permute_qk=False, norm_shift=1.0),
    "Exaone4ForCausalLM": Architecture("exaone4", permute_qk=False),
}
"""Hugging Face architectures kotune exports, by the name in ``config.json``'s ``architectures``."""

NOT_YET = {
    "Gemma3ForConditionalGeneration": "Gemma 3's vision tower (its text model, Gemma3ForCausalLM, is exported)",
    "MistralForCausalLM": "Mistral's SentencePiece tokenizer puts ▁ before the text (kotune writes Gemma 3's form)",
}
"""Architectures kotune trains but does not export yet, and why."""

ROPE_TYPES = ("default", "linear", "llama3")
"""Rotary embeddings written: plain, linear scaling (a key) and Llama 3.1's scaling (the ``rope_freqs`` tensor)."""


def architecture_of(config) -> Architecture:
    """The GGUF architecture of a transformers config; an error naming it and the supported ones otherwise."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            rope_type(config)  # refuse an unexported rope scaling before anything is merged or written
            if ARCHITECTURES[name].gguf_name == "gemma3":
                check_gemma3(config)
            if ARCHITECTURES[name].gguf_name == "exaone4" and getattr(config, "sliding_window", None) is not None:
                raise ExportError(
                    "this EXAONE 4 model has local layers with a sliding window (and global ones without RoPE); the "
                    "llama.cpp kotune checks against (llama-cpp-python 0.3.36) computes every layer as global with "
                    "RoPE from such a file, so its replies would not be the model's. EXAONE 4 without a window exports"
                )
            return ARCHITECTURES[name]
    found = f"{', '.join(names) or 'a model'} (model_type {getattr(config, 'model_type', None)!r})"
    why = next((f": {NOT_YET[n]}" for n in names if n in NOT_YET), "")
    raise ExportError(
        f"kotune cannot export {found} to GGUF yet{why}; it exports {', '.join(ARCHITECTURES)}. "
        "llama.cpp's own convert_hf_to_gguf.py may know this architecture: run it on the merged folder"
    )


# -- rotary embedding -------------------------------------------------------------------------------
def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """The config's rotary parameters (transformers 5's ``rope_parameters``, or the older ``rope_scaling``); of
    ``layer_type``'s layers where they differ by layer type (Gemma 3)."""
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.update(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get(layer_type), dict):
        return dict(params[layer_type])
    return params


def rope_type(config) -> str:
    kind = rope_parameters(config).get("rope_type") or rope_parameters(config).get("type") or "default"
    if kind not in ROPE_TYPES:
        raise ExportError(
            f"rope type {kind!r} is not exported by kotune yet (it writes {', '.join(ROPE_TYPES)}); llama.cpp's "
            "convert_hf_to_gguf.py may know it: run it on the merged folder"
        )
    return kind


def rope_theta(config) -> float:
    theta = rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError("config.json names no rope_theta")
    return float(theta)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_freq_divisors(config) -> np.ndarray | None:
    """Llama 3.1's scaling as llama.cpp's ``rope_freqs``: plain frequency / scaled frequency, one per rotary pair,
    both from transformers' rope functions. None for the other rope types."""
    if rope_type(config) != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    plain, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config, "cpu")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain.double() / scaled.double()).float().numpy()


def write_hyperparameters(writer, config) -> None:
    from gguf import RopeScalingType

    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(dim)
    writer.add_rope_freq_base(rope_theta(config))
    if rope_type(config) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope_parameters(config)["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "model_type", None) == "gemma3_text":
        writer.add_sliding_window(config.sliding_window)
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)


def check_gemma3(config) -> None:
    """Refuse a Gemma 3 config whose attention llama.cpp would compute differently, naming the field."""
    layers = config.num_hidden_layers
    pattern = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden / heads) for the 62-layer 27B
    scale = config.hidden_size // config.num_attention_heads if layers == 62 else head_dim(config)
    local = rope_parameters(config, "sliding_attention")
    differs = {
        "layer_types": (list(config.layer_types) != pattern, "every sixth layer global"),
        "query_pre_attn_scalar": (config.query_pre_attn_scalar != scale, f"{scale}"),
        "sliding_attention rope": (
            (local.get("rope_type") or "default") != "default" or float(local.get("rope_theta", 0)) != 10_000.0,
            "plain, base 10000",
        ),
        "attn_logit_softcapping": (getattr(config, "attn_logit_softcapping", None) is not None, "none"),
    }
    wrong = [f"{field} (llama.cpp assumes {expected})" for field, (bad, expected) in differs.items() if bad]
    if wrong:
        raise ExportError(
            f"llama.cpp computes Gemma 3's attention with fixed settings this model differs from: {'; '.join(wrong)}"
        )


# -- tensors ----------------------------------------------------------------------------------------
def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head from (first half, second half) order to interleaved pairs, llama.cpp's rotary layout."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class Tensor:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    file: Path | None
    """The safetensors file holding it; None for a tensor kotune computes (``data``)."""
    data: np.ndarray | None = None


def plan_tensors(model_dir: Path, config, arch: Architecture) -> list[Tensor]:
    """Every weight of the safetensors files with its GGUF name, then the tensors the architecture adds (Llama 3.1's
    ``rope_freqs``); an error for a weight GGUF has no name for."""
    from gguf import MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, get_tensor_name_map
    from safetensors import safe_open

    model_arch = {name: arch_id for arch_id, name in MODEL_ARCH_NAMES.items()}[arch.gguf_name]
    names = get_tensor_name_map(model_arch, config.num_hidden_layers)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no .safetensors weights")
    plan = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # llama.cpp reuses token_embd as the output projection when there is none
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(f"{file.name}: weight {hf_name} has no GGUF name for {arch.gguf_name}")
                plan.append(Tensor(gguf_name, hf_name, tuple(f.get_slice(hf_name).get_shape()), file))
    plan.sort(key=lambda t: t.hf_name)
    divisors = rope_freq_divisors(config)
    if divisors is not None:
        name = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(Tensor(name, "(rope scaling)", divisors.shape, None, divisors))
    return plan


def load_tensor(tensor: Tensor, config, arch: Architecture) -> np.ndarray:
    """The weight as float32 numpy, q / k rows permuted for llama.cpp's rotary when the architecture needs it."""
    import torch
    from safetensors import safe_open

    if tensor.file is None:
        return tensor.data
    with safe_open(tensor.file, framework="pt") as f:
        array = f.get_tensor(tensor.hf_name).to(torch.float32).numpy()
    if arch.permute_qk and tensor.hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in tensor.hf_name else config.num_key_value_heads
        array = permute_rotary(array, heads)
    if arch.norm_shift and tensor.hf_name.endswith("norm.weight"):
        array = array + np.float32(arch.norm_shift)
    return array
