"""A Llama-shaped model folder written directly in 4-bit (NF4, double quantization), and row slices read back.

A 70B base is ~140 GB in bfloat16 but ~37 GB in NF4. Tests and benches that need a base of that shape (random
weights; speed and memory do not depend on the values) write it here one tensor at a time, never holding more
than one shard file on the host. The folder is what transformers' ``save_pretrained`` writes for a model loaded
with ``bnb_config()`` (NF4, double quantization, bfloat16 compute, uint8 storage): per quantized linear weight
the packed uint8 ``<name>.weight`` and bitsandbytes' packed quant state beside it (``.absmax``, ``.quant_map``,
``.nested_absmax``, ``.nested_quant_map``, ``.quant_state.bitsandbytes__nf4``); embeddings, norms and ``lm_head``
(transformers keeps it unquantized) in bfloat16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

BLOCKSIZE, BLOCKSIZE2 = 64, 256
"""NF4 values per absmax, and absmaxes per nested (double-quantization) scale: bitsandbytes' defaults."""
GROUP = BLOCKSIZE * BLOCKSIZE2
"""Weight values under one nested scale; a row slice must start and end on a multiple of it."""
STATE_KEY = "quant_state.bitsandbytes__nf4"
DEFAULT_SHARD_BYTES = 2 * 2**30


def bnb_config():
    """The 4-bit settings the folder is written in (and that ``config.json`` records)."""
    from kotune.model.load import nf4_config

    return nf4_config(torch.bfloat16, storage=torch.uint8)


def tensor_plan(config) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every weight of a Llama-shaped model, kind ``norm``, ``dense`` or ``nf4``."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("write_random_4bit writes Llama weights without biases; set attention_bias/mlp_bias False")
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = [
        ("input_layernorm.weight", (hidden,), "norm"),
        ("self_attn.q_proj.weight", (q_out, hidden), "nf4"),
        ("self_attn.k_proj.weight", (kv_out, hidden), "nf4"),
        ("self_attn.v_proj.weight", (kv_out, hidden), "nf4"),
        ("self_attn.o_proj.weight", (hidden, q_out), "nf4"),
        ("post_attention_layernorm.weight", (hidden,), "norm"),
        ("mlp.gate_proj.weight", (inter, hidden), "nf4"),
        ("mlp.up_proj.weight", (inter, hidden), "nf4"),
        ("mlp.down_proj.weight", (hidden, inter), "nf4"),
    ]
    plan = [("model.embed_tokens.weight", (vocab, hidden), "dense")]
    for i in range(config.num_hidden_layers):
        plan += [(f"model.layers.{i}.{name}", shape, kind) for name, shape, kind in layer]
    plan.append(("model.norm.weight", (hidden,), "norm"))
    if not config.tie_word_embeddings:
        plan.append(("lm_head.weight", (vocab, hidden), "dense"))
    return plan


def stored_bytes(shape: tuple[int, ...], kind: str) -> int:
    """About what a weight takes in the files (bfloat16, or NF4 with its uint8 absmax), for planning shards."""
    numel = 1
    for size in shape:
        numel *= size
    return numel * 2 if kind != "nf4" else numel // 2 + numel // BLOCKSIZE


def shard_plan(plan: list, shard_bytes: int) -> list[list]:
    """The plan cut, in order, into files of about ``shard_bytes`` (a weight and its quant state stay together)."""
    shards, size = [[]], 0
    for entry in plan:
        need = stored_bytes(entry[1], entry[2])
        if shards[-1] and size + need > shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append(entry)
        size += need
    return shards


def random_tensors(name: str, shape, kind: str, generator, std: float, device) -> dict[str, torch.Tensor]:
    """One weight's tensors as stored: ones for a norm, normal(0, std) bfloat16 otherwise, NF4 for ``nf4``."""
    import bitsandbytes.functional as bnbf

    if kind == "norm":
        return {name: torch.ones(shape, dtype=torch.bfloat16)}
    weight = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=generator)
    if kind == "dense":
        return {name: weight.cpu()}
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
    )
    tensors = {name: packed}
    tensors.update({f"{name}.{key}": value for key, value in state.as_dict(packed=True).items()})
    return {key: value.cpu().contiguous() for key, value in tensors.items()}


def write_random_4bit(
    config, folder, seed: int = 0, device=None, shard_bytes: int = DEFAULT_SHARD_BYTES, quantized: bool = True
) -> Path:
    """Write a random Llama-shaped 4-bit model (safetensors shards, their index, ``config.json``) to ``folder``;
    ``quantized=False``: the same draws stored in bfloat16 (a 16-bit base, as most hub folders are).

    Each weight is drawn from its own generator seeded by ``seed`` and its position, on ``device`` (CPU when
    None), and quantized there, so the folder is the same byte for byte for the same seed and device, and the
    host holds one shard at a time. Norms are ones; other weights normal with std ``config.initializer_range``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or "cpu")
    std = getattr(config, "initializer_range", 0.02)
    plan = [(name, shape, kind if quantized or kind != "nf4" else "dense") for name, shape, kind in tensor_plan(config)]
    shards = shard_plan(plan, shard_bytes)
    weight_map, total, index = {}, 0, 0
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape, kind in shard:
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
            tensors.update(random_tensors(name, shape, kind, generator, std, device))
            index += 1
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n", encoding="utf-8")
    write_config(config, folder, quantized)
    return folder


def write_config(config, folder: Path, quantized: bool = True) -> None:
    """``config.json`` as transformers writes it for the model: bfloat16, with the 4-bit ``quantization_config``
    when ``quantized``."""
    config = config.__class__.from_dict(config.to_dict())  # a copy: the caller's config stays unquantized
    config.dtype = torch.bfloat16
    config.architectures = config.architectures or [type(config).__name__.removesuffix("Config") + "ForCausalLM"]
    if quantized:
        config.quantization_config = bnb_config().to_dict()
    config.save_pretrained(folder)


def weight_file(folder: Path, key: str) -> Path:
    """The shard holding ``key``, from the folder's index (or its single ``model.safetensors``)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return folder / "model.safetensors"
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    if key not in weight_map:
        raise ValueError(f"{index}: no tensor {key!r}; is it a quantized linear weight of this model?")
    return folder / weight_map[key]


def read_quantized_rows(folder, name: str, rows: tuple[int, int]) -> dict:
    """The NF4 pieces of output rows ``[r0, r1)`` of the quantized weight ``name`` (e.g.
    ``model.layers.0.self_attn.q_proj``), read as slices of the files, never the whole tensor.

    A rank of a sharded load keeps only its rows; reading slices keeps its host memory at its share. The nested
    scales cover 64 x 256 values each, so the slice must start and end on a whole group (or at the last row).
    """
    from safetensors import safe_open

    folder, key = Path(folder), f"{name}.weight"
    with safe_open(weight_file(folder, key), "pt") as f:
        state = json.loads(bytes(f.get_tensor(f"{key}.{STATE_KEY}").tolist()))
        out, cols = state["shape"]
        start, end = check_rows(name, rows, out, cols, state)
        return {
            "packed": _packed_bytes(f.get_slice(key), start // 2, end // 2),
            "absmax": f.get_slice(f"{key}.absmax")[start // BLOCKSIZE : -(-end // BLOCKSIZE)],
            "absmax2": f.get_slice(f"{key}.nested_absmax")[start // GROUP : -(-end // GROUP)],
            "code2": f.get_tensor(f"{key}.nested_quant_map"),
            "table": f.get_tensor(f"{key}.quant_map"),
            "offset": float(state["nested_offset"]),
            "blocksize": BLOCKSIZE,
            "blocksize2": BLOCKSIZE2,
            "shape": (out, cols),
        }


def _packed_bytes(packed, first: int, last: int) -> torch.Tensor:
    """Bytes ``[first, last)`` of a packed weight stored in any dtype (bitsandbytes' ``quant_storage``: uint8,
    or the compute dtype, two or four bytes to an element), as uint8."""
    size = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4}[packed.get_dtype()]
    return packed[first // size : -(-last // size)].reshape(-1).view(torch.uint8)


def check_rows(name: str, rows: tuple[int, int], out: int, cols: int, state: dict) -> tuple[int, int]:
    """Flat value range ``[start, end)`` of ``rows``, or a ValueError saying why they cannot be read alone."""
    r0, r1 = rows
    where = f"{name}: rows [{r0}, {r1}) of a ({out}, {cols}) weight"
    blocks = (state["blocksize"], state.get("nested_blocksize"))
    if blocks != (BLOCKSIZE, BLOCKSIZE2):
        raise ValueError(f"{where}: written with blocksizes {blocks}; only ({BLOCKSIZE}, {BLOCKSIZE2}) can be sliced")
    if not 0 <= r0 < r1 <= out:
        raise ValueError(f"{where}: need 0 <= r0 < r1 <= {out}")
    start, end = r0 * cols, r1 * cols
    if start % GROUP or (end % GROUP and r1 != out):
        raise ValueError(
            f"{where}: each end must fall on a whole nested group of {GROUP} values ({BLOCKSIZE} x {BLOCKSIZE2});"
            f" use row bounds that are multiples of {GROUP // math.gcd(GROUP, cols)} (or the last row)"
        )
    return start, end
