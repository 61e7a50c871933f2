"""Loading a base straight into FSDP shards, a decoder layer at a time: no process ever holds the whole base.

A 70B base is ~37 GB in NF4: more than a 24 GB card, so it cannot be loaded whole on each GPU and then sharded.
The model is built on the meta device (no memory), LoRA is attached and drawn as peft draws it, then each layer's
weights are read from the safetensors files onto this process's device as 4-bit
:class:`~kotune.fast.nf4_tensor.NF4Tensor` and handed to ``fully_shard``, which keeps this process's rows and
frees the rest before the next layer is read. Peak: the shards so far plus one layer. A folder stored in 4 bits
(transformers' ``save_pretrained`` of a bitsandbytes 4-bit model, or ``kotune.model.prequantized``) is read as
stored; a 16-bit folder's weights are quantized on the way, one at a time, as a normal load quantizes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from kotune.config import Config
from kotune.fast.nf4_tensor import NF4Tensor
from kotune.model.assets import AssetError
from kotune.model.load import refuse_missing_weights, refuse_pickle_weights


def is_prequantized(path: str) -> bool:
    """The folder's ``config.json`` says its weights are stored in bitsandbytes' 4-bit format."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    return quant.get("quant_method") == "bitsandbytes" and bool(quant.get("load_in_4bit"))


def load_sharded(path: str, cfg: Config, attach_lora, shard_layer):
    """The LoRA model of the folder ``path`` with every decoder layer sharded by ``shard_layer`` (called once per
    layer, its weights on this device); ``attach_lora(model)`` wraps it in peft as a normal load does. A 4-bit
    folder's weights are read as stored; a 16-bit one's are quantized here as bitsandbytes quantizes on a normal
    load (``model.double_quant``), a weight at a time. The policy of every base load holds (``model.load``): pickle
    weights refused, and a weight missing from the files refused before any is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    refuse_pickle_weights(path, cfg.model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    config.use_cache = False
    files = WeightFiles(path, cfg.model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            config, dtype=files.dtype, trust_remote_code=cfg.model.trust_remote_code
        )
    refuse_missing_weights(path, files.missing(skeleton))
    model = attach_lora(skeleton)  # peft draws its weights on the CPU, then moves them to the meta device
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)  # where a normal load's peft starts drawing
    draw_lora_as_peft(model, device)
    base = model.get_base_model()
    for name, module in base.named_modules():  # everything outside the decoder layers: embeddings, norm, head
        if ".layers." not in f"{name}." and not name.endswith(".layers"):
            files.fill(module, name, device)
    if getattr(config, "tie_word_embeddings", False):
        base.tie_weights()
    inner = base.model
    # its inverse frequencies are a buffer computed at construction, not read from the files: computed on the
    # CPU, as from_pretrained does (on a GPU, pow rounds differently and the rotary tables drift by an ulp)
    inner.rotary_emb = type(inner.rotary_emb)(config=config).to(device)
    for i, layer in enumerate(inner.layers):
        for name, module in layer.named_modules():
            if _is_lora(name) or list(module.children()):
                continue
            full = f"model.layers.{i}.{name.replace('.base_layer', '')}"  # as the files name it
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(files.nf4(full, device), requires_grad=False)
            else:
                files.fill(module, full, device)
        shard_layer(layer)
    return model


def _is_lora(name: str) -> bool:
    return ".lora_" in f".{name}" or "lora_dropout" in name


def draw_lora_as_peft(model, device: torch.device) -> None:
    """The LoRA weights, materialized from the meta device with the values a normal load draws: per LoRA layer in
    module order, peft builds ``Linear(in, r)`` and ``Linear(r, out)`` (each drawing its default init from the
    default generator), then redraws A Kaiming-uniform (a = sqrt(5)) and zeroes B; float32. Called right after
    ``torch.manual_seed(train.seed)``, as a normal load reaches peft (loading draws nothing), the adapters are
    equal (``tests/test_fsdp.py`` checks it)."""
    for module in model.modules():
        if hasattr(module, "lora_A"):
            for name in module.lora_A:
                r, fan_in = module.lora_A[name].weight.shape
                a = torch.nn.Linear(fan_in, r, bias=False).weight.detach()
                torch.nn.Linear(r, module.lora_B[name].weight.shape[0], bias=False)  # its draw, as peft makes it
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                module.lora_A[name].weight = torch.nn.Parameter(a.to(device))
                shape = module.lora_B[name].weight.shape
                module.lora_B[name].weight = torch.nn.Parameter(torch.zeros(shape, device=device))


class WeightFiles:
    """The folder's safetensors files, read one tensor (or one 4-bit weight) at a time, in the dtype a normal load
    gives them: a 4-bit folder's compute dtype (transformers uses the folder's own ``quantization_config``, not
    ``model.compute_dtype``), else ``model.compute_dtype``."""

    def __init__(self, path: str, model_cfg):
        from kotune.model import prequantized

        self.folder, self.io, self.model_cfg = Path(path), prequantized, model_cfg
        self.prequantized = is_prequantized(path)
        if (
            not (self.folder / "model.safetensors.index.json").is_file()
            and not (self.folder / "model.safetensors").is_file()
        ):
            raise AssetError(
                f"model {path}: no model.safetensors (or model.safetensors.index.json); train.distributed fsdp "
                "reads safetensors only: convert the weights, or train with train.distributed ddp"
            )
        if self.prequantized:
            config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
            self.dtype = getattr(torch, config["quantization_config"]["bnb_4bit_compute_dtype"])
        else:
            self.dtype = model_cfg.torch_dtype()

    def missing(self, model: torch.nn.Module) -> list[str]:
        """Parameters of ``model`` (before LoRA: named as the files name them) that no file holds; a tied output
        layer shares the embeddings' parameter and is not asked for."""
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            stored = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        else:
            from safetensors import safe_open

            with safe_open(self.folder / "model.safetensors", "pt") as f:
                stored = set(f.keys())
        return [name for name, _ in model.named_parameters() if name not in stored]

    def fill(self, module: torch.nn.Module, name: str, device) -> None:
        """``module``'s own (frozen, unquantized) parameters read from the files (a tied output layer: none)."""
        for key in [key for key, _ in module.named_parameters(recurse=False)]:
            tensor = self.dense(f"{name}.{key}", device)
            if tensor is not None:
                setattr(module, key, torch.nn.Parameter(tensor, requires_grad=False))

    def dense(self, key: str, device) -> torch.Tensor | None:
        """The tensor ``key`` (None when the files lack it: a tied output layer)."""
        from safetensors import safe_open

        try:
            file = self.io.weight_file(self.folder, key)
        except ValueError:
            return None
        with safe_open(file, "pt") as f:
            return f.get_tensor(key).to(device, self.dtype) if key in f.keys() else None

    def nf4(self, name: str, device) -> NF4Tensor:
        """The linear weight ``name`` (without ``.weight``) whole, on ``device``, in 4 bits."""
        if not self.prequantized:
            return self._quantized(name, device)
        from safetensors import safe_open

        with safe_open(self.io.weight_file(self.folder, f"{name}.weight"), "pt") as f:
            out = json.loads(bytes(f.get_tensor(f"{name}.weight.quant_state.bitsandbytes__nf4").tolist()))["shape"][0]
        p = self.io.read_quantized_rows(self.folder, name, (0, out))
        offset = torch.tensor([p["offset"]], dtype=torch.float32, device=device)
        moved = {k: p[k].to(device) for k in ("packed", "absmax", "absmax2", "code2", "table")}
        return NF4Tensor(p["shape"], self.dtype, moved["packed"], moved["absmax"], moved["absmax2"], moved["code2"],
                         moved["table"], offset, p["blocksize"], p["blocksize2"], p["shape"][1])  # fmt: skip

    def _quantized(self, name: str, device) -> NF4Tensor:
        """A 16-bit weight quantized as a normal load quantizes it (bitsandbytes NF4, blocks of 64)."""
        import bitsandbytes.functional as F

        weight = self.dense(f"{name}.weight", device)  # there: ``missing`` found every weight before any was read
        packed, state = F.quantize_4bit(
            weight, blocksize=64, compress_statistics=self.model_cfg.double_quant, quant_type="nf4"
        )
        return NF4Tensor.from_quant_state(packed, state)
