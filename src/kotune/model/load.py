"""Loading the tokenizer and the base model (4-bit NF4 / 8-bit / full precision) and attaching LoRA."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import warnings

import torch

from kotune import output
from kotune.config import ModelConfig
from kotune.model.assets import AssetError
from kotune.security import refuse_pickle


def load_tokenizer(path: str, cfg: ModelConfig):
    """The base model's tokenizer with a pad token set (``model.pad_token``, its own, else EOS)."""
    from transformers import AutoTokenizer

    quiet_transformers()  # the first load of most commands: before any config.json is read
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
    """The ``BitsAndBytesConfig`` of ``model.quantization``: ``nf4_config`` for ``4bit``, None for ``none``."""
    if cfg.quantization == "none":
        return None
    if cfg.quantization == "8bit":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    return nf4_config(cfg.torch_dtype(), cfg.double_quant)


def nf4_config(compute_dtype: torch.dtype, double_quant: bool = True, storage: torch.dtype | None = None):
    """The walkthrough's 4-bit ``BitsAndBytesConfig``: NF4 weights, matrix products in ``compute_dtype``.

    ``storage`` is the dtype the packed 4-bit bytes are held in; unset, ``compute_dtype`` (what training loads
    with); ``prequantized`` writes ``uint8``, what transformers saves by default. Tests and benches build their
    4-bit bases here too (float32 for exact CPU checks), so every 4-bit model is quantized the same way.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage or compute_dtype,
    )


def keep_4bit_weights_exact(model) -> int:
    """Stop bitsandbytes from repacking this model's 4-bit weights for its CPU inference kernel; returns the count.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) rewrites a ``Linear4bit``'s weight in place the first time it
    runs in eval mode without gradients (``Linear4bit.forward`` -> ``_convert_weight_packed_for_cpu``): the absmax
    constants are rounded to bfloat16 and the matrix product runs in bfloat16 from then on, also after going back
    to training. That made an evaluation change later training steps, and the adapter on the 4-bit base drift
    (2.3e-4 mean |logit| difference) from the exact dequantized merge. The packed layout only feeds a kernel
    fetched from the hub (kernels-community), so turning it off costs nothing here. ``tests/test_model_load.py``
    fails when a bitsandbytes release no longer has the attribute or the repacking.
    """
    import bitsandbytes as bnb

    modules = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in modules:
        module.support_avx512bf16_for_cpu = False
    return len(modules)


class _DropExactMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' import-time warning that its hub-fetched CPU kernel is missing (``kernels`` package).

    kotune never uses that kernel (``keep_4bit_weights_exact``), so the message is noise a user cannot act on.
    Only that one message of that one logger is dropped; call before bitsandbytes is imported.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropExactMessage("Failed to load CPU gemm_4bit_forward from kernels-community")
    )


TORCH_DTYPE_NOTICE = "`torch_dtype` is deprecated! Use `dtype` instead!"
"""What transformers 5 logs when a model's ``config.json`` has the old ``torch_dtype`` key (most hub checkpoints)."""


def quiet_transformers() -> None:
    """Make transformers' loading quiet and log-friendly; safe to call more than once.

    Drops transformers' ``torch_dtype`` deprecation notice: kotune passes ``dtype``, and the old key sits in the
    model's ``config.json``, which a user should not have to edit. It is filtered on transformers' own handlers, so
    it is dropped whichever module logs it (5.17 and 5.24 log it from different places), and nothing else is. When
    stderr is not a terminal (scheduler logs, nohup), turns transformers' and the hub's progress bars off through
    ``transformers.utils.logging.disable_progress_bar``: each redraw would be a line in the log. Loading then
    prints one line per phase (``loading_line``) instead.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # transformers adds its handler on first use; it must exist to filter
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _DropExactMessage) for f in handler.filters):
            handler.addFilter(_DropExactMessage(TORCH_DTYPE_NOTICE))
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def loading_line(what: str) -> None:
    """One status line for a loading phase when transformers' progress bars are off (stderr is not a terminal)."""
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        output.status(f"kotune: loading {what}")


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing through the transformers API of the installed version.

    transformers 5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
    name warns); 5.17 has only the old name.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def peft_quietly():
    """Wrap a model in peft without the FutureWarning peft 0.21 triggers in transformers 5.24.

    ``PeftModel.__init__`` reads ``is_gradient_checkpointing``, a property transformers 5.24 deprecated: nothing
    a kotune user can change. Only that message, and only inside this block, is ignored.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


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
    model = base_from_pretrained(path, cfg)
    model.config.use_cache = False
    if fast_path:
        return model
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # peft would enable checkpointing through the name transformers 5.24 deprecated; it is done below
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
        if cfg.quantization == "none":  # non-reentrant checkpointing needs no input gradients; as before
            model.enable_input_require_grads()
    return model


def load_base(model_cfg: ModelConfig, quantization: str):
    """The base model as ``model_cfg`` names it, quantized as asked (``4bit``, ``8bit`` or ``none``), for inference."""
    from kotune.model.assets import resolve_model

    model_cfg = dataclasses.replace(model_cfg, quantization=quantization)
    return base_from_pretrained(resolve_model(model_cfg.path), model_cfg)


# -- the one policy for a base's weights ------------------------------------------------------------------
def base_from_pretrained(path: str, cfg: ModelConfig):
    """The base at ``path`` through transformers, quantized as ``cfg`` says, under the policy every load of a base
    follows (training, merge, chat, generate, eval; ``sharded_load`` makes the same two checks): pickle weights
    only with ``model.allow_pickle`` (``refuse_pickle_weights``, and transformers told to read safetensors only),
    and no weight missing from the files (``refuse_missing_weights``)."""
    from transformers import AutoModelForCausalLM

    refuse_pickle_weights(path, cfg)
    quiet_transformers()
    loading_line(f"weights of {path} ({cfg.quantization})")
    model, loading = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization_config(cfg),
        dtype=cfg.torch_dtype(),
        device_map=device_map(),
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        use_safetensors=None if cfg.allow_pickle else True,  # hub names too: no pickle weights unless allowed
        output_loading_info=True,
    )
    refuse_missing_weights(path, loading["missing_keys"])
    if cfg.quantization == "4bit":
        keep_4bit_weights_exact(model)  # an adapter must run on the weights it was trained against
    return model


def refuse_pickle_weights(path: str, cfg: ModelConfig) -> None:
    """A local model folder holding pickle weights and no safetensors is refused unless ``model.allow_pickle``
    (a SecurityError naming the files); a hub name is kept to safetensors by the loader itself."""
    if os.path.isdir(path):
        refuse_pickle(path, cfg.allow_pickle, "model folder", "model.allow_pickle: true")


class MissingWeights(AssetError):
    """A base whose weight files lack some of its weights; the message names the folder and the weights."""


def refuse_missing_weights(path: str, missing) -> None:
    """transformers fills weights absent from the files with random values and only warns: that is an error here,
    raised the same way by every loader.

    (A folder with the real weights in ``pytorch_model.bin`` and an unrelated ``model.safetensors`` loaded every
    weight at random and trained on it.)
    """
    if missing:
        names = sorted(missing)
        raise MissingWeights(
            f"model {path}: {len(names)} weights are missing from its files ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}), so they would be random. Check the folder's weight files: "
            "a .safetensors file that belongs to another model? (pickle weights load only with model.allow_pickle)"
        )
