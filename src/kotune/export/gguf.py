"""Write a merged model folder as one GGUF file, the format llama.cpp, Ollama and LM Studio read.

What goes in (names as llama.cpp's ``convert_hf_to_gguf.py`` writes them, through the ``gguf`` library's keys and
tensor-name maps):

* hyperparameters under ``{arch}.*`` and weights under GGUF's ``token_embd`` / ``blk.N.attn_q`` / ... names
  (:mod:`kotune.export.gguf_arch`: Llama with its rope scalings, Qwen2, Qwen3, Gemma 3).
* the tokenizer: a byte-level BPE vocabulary with its merges and the pre-tokenizer's name (which regex llama.cpp
  splits text with), or SentencePiece pieces with their scores (Gemma 3); token types (special added tokens are
  control tokens), BOS / EOS / end-of-turn / padding ids, and whether BOS is put in front.
* ``tokenizer.chat_template``: the Jinja template kotune's merge saved, which renders prompts exactly as the run
  trained them (the ko-alpaca template, or the model's chat template for runs trained on conversations).

Tensor types follow llama.cpp's converter: 1-D tensors (norms, biases) stay float32; 2-D weights take the chosen
type; ``q8_0`` falls back to float16 for a tensor whose rows are not a multiple of its 32-value block. Tensors are
converted and written one at a time, so memory holds one tensor, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kotune import output
from kotune.export.atomic import partial_file, sibling
from kotune.export.gguf_arch import Tensor, architecture_of, load_tensor, plan_tensors, write_hyperparameters
from kotune.export.gguf_tokenizer import ExportError, GgufTokenizer, gguf_tokenizer, write_tokenizer
from kotune.export.kquant import K_QUANTS, SIZE_FRACTION, quantizer

QUANTS = ("f32", "f16", "bf16", "q8_0", *K_QUANTS)
"""``--quant`` choices: float32, float16, bfloat16, llama.cpp's 8-bit blocks (32 values, one f16 scale), and its
4-, 5- and 6-bit k-quants (written by llama.cpp's quantizer: :mod:`kotune.export.kquant`)."""


def tensor_type(quant: str, shape: tuple[int, ...]):
    """The GGML type a tensor of ``shape`` is written in for ``--quant quant``."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or quant == "f32":
        return T.F32
    chosen = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[quant]
    block, _ = GGML_QUANT_SIZES[chosen]
    return chosen if shape[-1] % block == 0 else T.F16


def encode_tensor(array: np.ndarray, qtype) -> np.ndarray:
    """``array`` (float32) in GGML type ``qtype``: float arrays for F32 / F16, blocks as bytes otherwise."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return array.astype(np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    return quants.quantize(array, qtype)


def encoded_size(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes) of ``encode_tensor``'s result, known before any data is read."""
    from gguf import GGMLQuantizationType as T
    from gguf import quant_shape_to_byte_shape

    if qtype in (T.F32, T.F16):
        dtype = np.dtype(np.float32 if qtype == T.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


# -- the file ---------------------------------------------------------------------------------------
def file_type(quant: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[quant]


def estimate_size(plan: list[Tensor], types: dict, tokenizer: GgufTokenizer) -> int:
    """Bytes the file will take: every tensor as encoded, the vocabulary and merges, and 1 MiB for the rest."""
    tensors = sum(encoded_size(t.shape, types[t.gguf_name])[2] + 32 for t in plan)  # 32: GGUF's alignment
    strings = sum(len(s.encode()) + 8 for s in (*tokenizer.tokens, *tokenizer.merges)) + 4 * len(tokenizer.types)
    return tensors + strings + (1 << 20)


def write_gguf(
    model_dir: str | Path,
    out: str | Path,
    quant: str,
    chat_template: str | None,
    stop_ids: list[int],
    name: str | None = None,
) -> Path:
    """Write the model folder ``model_dir`` (config, safetensors, tokenizer) to the GGUF file ``out``.

    ``chat_template``: Jinja stored as ``tokenizer.chat_template``; ``stop_ids``: the ids that end a reply (EOS
    first is not required; the tokenizer's EOS is written as EOS and the first other id as end-of-turn). Everything
    is checked before any file or folder is made; the file is written beside ``out`` (``export.atomic``).
    """
    from transformers import AutoConfig, AutoTokenizer

    if quant not in QUANTS:
        raise ExportError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    quantize = quantizer(quant) if quant in K_QUANTS else None
    model_dir, out = Path(model_dir), Path(out)
    config = AutoConfig.from_pretrained(model_dir)
    arch = architecture_of(config)
    tokenizer = gguf_tokenizer(AutoTokenizer.from_pretrained(model_dir), config.vocab_size, stop_ids, chat_template)
    plan = plan_tensors(model_dir, config, arch)
    written = quant if quantize is None else sixteen_bit(config)  # a k-quant is made from a 16-bit file
    types = {t.gguf_name: tensor_type(written, t.shape) for t in plan}
    size = estimate_size(plan, types, tokenizer)
    with partial_file(out, size if quantize is None else int(size * (1 + SIZE_FRACTION[quant]))) as partial:
        if quantize is None:
            write_file(partial, model_dir, config, arch, tokenizer, plan, types, written, name)
        else:
            with sibling(partial, written) as source:
                write_file(source, model_dir, config, arch, tokenizer, plan, types, written, name)
                quantize(source, partial)
    return out


def sixteen_bit(config) -> str:
    """The 16-bit type a k-quant starts from: bf16 for a bf16 model (no overflow), f16 otherwise."""
    return (
        "bf16"
        if str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", "")).endswith("bfloat16")
        else "f16"
    )


def write_file(path: Path, model_dir: Path, config, arch, tokenizer, plan, types, quant: str, name) -> None:
    """The GGUF itself, one tensor in memory at a time."""
    import gguf

    writer = gguf.GGUFWriter(path, arch.gguf_name)
    writer.add_name(name or model_dir.name)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hyperparameters(writer, config)
    write_tokenizer(writer, tokenizer)
    for t in plan:
        shape, dtype, nbytes = encoded_size(t.shape, types[t.gguf_name])
        writer.add_tensor_info(t.gguf_name, shape, dtype, nbytes, raw_dtype=types[t.gguf_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in plan:
        writer.write_tensor_data(encode_tensor(load_tensor(t, config, arch), types[t.gguf_name]))
    writer.close()


# -- from a kotune folder -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A merged model folder ready to export, with what kotune knows of how its run prompted and stopped."""

    model_dir: Path
    chat_template: str | None
    """Renders prompts exactly as training did (``kotune.run_folder.trained_chat_template``), else the model's."""
    stop_ids: list[int]
    """Ids that end a reply: EOS, end-of-turn, the model's own EOS ids."""
    eos_token: str
    stop_tokens: list[str]
    """``stop_ids`` as token strings."""


def source_of(path: str | Path) -> Source:
    """A run folder merged first (``kotune merge``'s default output, ``RUN_DIR/merged``, reused when it already
    holds this merge), or a merged folder as it is."""
    from transformers import AutoTokenizer, GenerationConfig

    from kotune.data.conversations import stop_ids
    from kotune.export.merge import base_config, merge
    from kotune.run_folder import open_folder, trained_chat_template

    folder = open_folder(path)
    if not folder.merged:
        architecture_of(base_config(folder))  # refuse before a merge of minutes
        output.info(f"kotune: {folder.path} is a run: merging it first")
        folder = open_folder(merge(folder.path))
    tokenizer = AutoTokenizer.from_pretrained(folder.path)
    template = trained_chat_template(folder, tokenizer) or tokenizer.chat_template
    stops = stop_ids(tokenizer, GenerationConfig.from_pretrained(folder.path), template)
    return Source(
        folder.path, template, stops, tokenizer.eos_token, [tokenizer.convert_ids_to_tokens(i) for i in stops]
    )


def export_gguf(path: str | Path, quant: str, out: str | Path | None = None) -> Path:
    """``kotune export PATH --format gguf``: the GGUF file of a run (merged first) or a merged folder."""
    source = source_of(path)
    out = Path(out) if out is not None else default_gguf_path(Path(path), quant)
    refuse_existing(out)
    write_gguf(source.model_dir, out, quant, source.chat_template, source.stop_ids, name=Path(path).resolve().name)
    output.info(f"kotune: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {quant})")
    return out


def default_gguf_path(path: Path, quant: str) -> Path:
    """``FOLDER/FOLDER_NAME-QUANT.gguf`` in the folder given (a run or a merged folder)."""
    return path / f"{path.resolve().name}-{quant}.gguf"


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise ExportError(f"{out} already exists; move it away or choose --out")
