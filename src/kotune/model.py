"""Loading the tokenizer and the base model (4-bit NF4 / 8-bit / full precision) and attaching LoRA."""

from __future__ import annotations

import torch

from kotune.assets import AssetError
from kotune.config import Config, ConfigError, LoraConfig, ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_tokenizer(path: str, cfg: ModelConfig):
    """The base model's tokenizer with a pad token set (``model.pad_token``, its own, else EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if cfg.pad_token is not None:
        if cfg.pad_token not in tokenizer.get_vocab():
            raise ValueError(f"model.pad_token '{cfg.pad_token}' is not in the tokenizer's vocabulary")
        tokenizer.pad_token = cfg.pad_token
    elif tokenizer.pad_token is None:
        # Safe here: collation pads labels with -100 by position, so the real EOS stays trained.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(cfg: ModelConfig):
    """The walkthrough's ``BitsAndBytesConfig`` for ``4bit``; None for ``none``."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = DTYPES[cfg.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def device_map() -> dict[str, object]:
    """Whole model on this process's device: its local GPU under torchrun / accelerate, else the CPU."""
    if torch.cuda.is_available():
        import os

        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def load_base_model(path: str, cfg: ModelConfig, fast_path: bool = False):
    """The base model, quantized as configured, in training-ready state for k-bit LoRA.

    ``fast_path``: leave dtypes as loaded and skip transformers' gradient checkpointing; ``kotune.fast``
    checkpoints layers itself and never needs the fp32 copies of embeddings, norms and output layer that
    peft's ``prepare_model_for_kbit_training`` makes (2 GiB more for an 8B model).
    """
    from transformers import AutoModelForCausalLM

    quant = quantization_config(cfg)
    model, loading = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        dtype=DTYPES[cfg.compute_dtype],
        device_map=device_map(),
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        use_safetensors=None if cfg.allow_pickle else True,  # hub names too: no pickle weights unless allowed
        output_loading_info=True,
    )
    refuse_missing_weights(path, loading["missing_keys"])
    model.config.use_cache = False
    if cfg.quantization == "4bit":
        keep_4bit_weights_as_quantized(model)
    if fast_path:
        return model
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def keep_4bit_weights_as_quantized(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns how many layers it touched.

    On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit.forward`` converts the weight in place, the first time
    it runs in eval mode without gradients, to a packed layout whose block scales (absmax) are rounded to
    bfloat16 (``bitsandbytes/nn/modules.py: Linear4bit.forward`` -> ``functional._convert_weight_packed_for_cpu``;
    bitsandbytes 0.50). Every later forward, training included, then uses those rounded scales: one evaluation
    changed all later losses (5e-6 relative on the tiny test model), and a run resumed in a new process, whose
    weights were never repacked, no longer matched the uninterrupted one. The layer's own capability flag
    (``support_avx512bf16_for_cpu``, set from ``has_avx512bf16()`` at construction) is the switch bitsandbytes
    reads; turning it off keeps the weights exactly as quantized. ``test_model.py::
    test_bitsandbytes_still_repacks_4bit_weights_in_eval`` fails when bitsandbytes stops doing this.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def refuse_missing_weights(path: str, missing) -> None:
    """transformers fills weights absent from the files with random values and only warns: that is an error here.

    (A folder with the real weights in ``pytorch_model.bin`` and an unrelated ``model.safetensors`` loaded every
    weight at random and trained on it.)
    """
    if missing:
        names = sorted(missing)
        raise AssetError(
            f"model {path}: {len(names)} weights are missing from its files ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}), so they would be random. Check the folder's weight files: "
            "a .safetensors file that belongs to another model? (pickle weights load only with model.allow_pickle)"
        )


def check_target_modules(cfg: Config, path: str) -> None:
    """Fail before the weights load if a ``lora.target_modules`` name matches no module of the model.

    peft matches a name to a module whose full name is that name or ends in ``.NAME``; the model's modules are
    listed from its config on the meta device, which allocates nothing.
    """
    if cfg.lora.target_modules == "all-linear":
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    names = [name for name, _ in skeleton.named_modules()]
    unmatched = [t for t in cfg.lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"'lora.target_modules': {', '.join(unmatched)} match no module of {path}; its linear layers are "
            f"{', '.join(linear)} (or use all-linear)"
        )


def attach_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as stored elements, like the walkthrough's printout."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_for_training(cfg: Config, path: str):
    """Tokenizer and LoRA-wrapped model for a run; prints trainable / total parameters like the walkthrough."""
    tokenizer = load_tokenizer(path, cfg.model)
    torch.manual_seed(cfg.train.seed)  # LoRA A is drawn at random
    from transformers import AutoConfig

    from kotune import fast

    fast_path, _ = fast.wanted(cfg, AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code))
    model = attach_lora(load_base_model(path, cfg.model, fast_path), cfg.lora)
    trainable, total = parameter_counts(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return tokenizer, model
