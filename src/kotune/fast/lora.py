"""A frozen (optionally 4-bit) linear layer plus its LoRA update, as one autograd function.

``y = x W^T + b + s * (dropout(x) A^T) B^T``. Forward dequantizes ``W`` into a temporary, backward
dequantizes it again instead of keeping it: per layer only ``dropout(x)`` and the rank-r product
``dropout(x) A^T`` are saved. Gradients: ``dx = dy W + s (dy B) A`` (through the dropout mask),
``dB = s dy^T (x A^T)``, ``dA = s (dy B)^T dropout(x)``. The module objects stay peft's and bitsandbytes'
(read, never replaced), so saving and loading the adapter is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from kotune.fast import nf4
from kotune.fast.nf4_tensor import NF4Tensor


@dataclass
class Projection:
    """What the fast path reads from one linear module (peft LoRA layer, bitsandbytes 4-bit, or plain)."""

    base: torch.nn.Module
    lora_a: torch.nn.Parameter | None = None
    lora_b: torch.nn.Parameter | None = None
    scale: float = 0.0
    dropout: float = 0.0
    triton_dequant: bool = True
    """Dequantize NF4 weights with ``kotune.fast.nf4`` on CUDA (one launch) instead of bitsandbytes (three)."""
    _nf4: nf4.NF4Weight | None = field(default=None, repr=False)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen weight ``[out, in]`` in ``dtype``; a fresh dequantized copy for 4-bit layers."""
        w = self.base.weight
        if isinstance(w, NF4Tensor):  # FSDP: this layer's gathered weight (kotune.training.fsdp)
            return w.dequantize(dtype) if self.triton_dequant else w.dequantize_reference(dtype)
        if isinstance(w, DTensor):  # FSDP's shard: only a gathered() block has the whole weight
            raise RuntimeError("a sharded weight was read outside its layer's gathered() block")
        qs = getattr(w, "quant_state", None)
        if qs is None:
            return w.to(dtype)
        if self.triton_dequant and w.is_cuda and qs.quant_type == "nf4" and nf4.available():
            if self._nf4 is None:
                self._nf4 = nf4.NF4Weight.of(w)
            return self._nf4.dequantize(dtype)
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(w.data, qs).to(dtype)

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        b = getattr(self.base, "bias", None)
        return None if b is None else b.to(dtype)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in (self.lora_a, self.lora_b) if p is not None]


class UnsupportedModule(ValueError):
    """A module the fast path cannot read exactly (it then stays on the plain path)."""


def read_projection(module: torch.nn.Module) -> Projection:
    """A :class:`Projection` for a peft LoRA linear layer or a bare (4-bit or plain) linear layer."""
    if hasattr(module, "lora_A"):
        active = list(module.active_adapters)
        if module.merged or module.disable_adapters or len(active) != 1:
            raise UnsupportedModule(f"{type(module).__name__}: needs exactly one active, unmerged adapter")
        name = active[0]
        if module.use_dora.get(name) or getattr(module, "lora_bias", {}).get(name) or module.lora_variant:
            raise UnsupportedModule(f"{type(module).__name__}: DoRA, LoRA bias and variants are not supported")
        dropout = module.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
        base = module.get_base_layer()
        _check_base(base)
        return Projection(base, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name], p)
    _check_base(module)
    return Projection(module)


def _check_base(module: torch.nn.Module) -> None:
    w = getattr(module, "weight", None)
    if w is None or w.requires_grad:
        raise UnsupportedModule(f"{type(module).__name__}: base weight must exist and be frozen")
    if w.dtype in (torch.int8, torch.uint8) and getattr(w, "quant_state", None) is None:
        raise UnsupportedModule(f"{type(module).__name__}: 8-bit weights are not supported")


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, proj: Projection, a, b, dtype, casts):
        w = proj.weight(dtype)
        out = torch.nn.functional.linear(x, w, proj.bias(dtype))
        del w
        ctx.proj, ctx.dtype, ctx.shared = proj, dtype, x_lora is x
        if a is None:
            ctx.save_for_backward(None, None, None, None)
            return out
        a_c, b_c = adapter_in(proj, dtype, casts)
        ctx.param_dtypes = a.dtype, b.dtype
        flat = x_lora.reshape(-1, x_lora.shape[-1])
        xa = flat @ a_c.T
        out2d = out.view(-1, out.shape[-1])
        out2d.addmm_(xa, b_c.T, alpha=proj.scale)
        ctx.save_for_backward(flat, xa, a_c, b_c)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        flat, xa, a, b = ctx.saved_tensors  # the adapter already in the compute dtype
        proj, dtype = ctx.proj, ctx.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        grad_x = grad_x_lora = grad_a = grad_b = None
        gb = None if a is None else (g @ b) * proj.scale
        if ctx.needs_input_grad[0]:
            grad_x = g @ proj.weight(dtype)
            if gb is not None and ctx.shared:
                grad_x.addmm_(gb, a)
            grad_x = grad_x.view(grad_out.shape[:-1] + (grad_x.shape[-1],))
        if gb is not None and ctx.needs_input_grad[1] and not ctx.shared:
            grad_x_lora = (gb @ a).view(grad_out.shape[:-1] + (a.shape[1],))
        if a is not None:
            grad_a = (gb.T @ flat).to(ctx.param_dtypes[0])
            grad_b = (proj.scale * (g.T @ xa)).to(ctx.param_dtypes[1])
        return grad_x, grad_x_lora, None, grad_a, grad_b, None, None


def adapter_in(proj: Projection, dtype: torch.dtype, casts: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``proj``'s LoRA A and B in ``dtype``, detached. ``casts``, when given, keeps them for the rest of one
    forward and its backward (the adapter does not change in between): cast once a pass instead of at each of the
    ~7 uses (forward, recomputation, backward), a launch each."""
    if casts is not None and id(proj) in casts:
        return casts[id(proj)]
    pair = proj.lora_a.detach().to(dtype), proj.lora_b.detach().to(dtype)
    if casts is not None:
        casts[id(proj)] = pair
    return pair


def project(x: torch.Tensor, proj: Projection, training: bool, casts: dict | None = None) -> torch.Tensor:
    """``proj``'s output for ``x`` in ``x``'s dtype (LoRA dropout applied when training); ``casts``: one pass's
    store of the adapter in the compute dtype (:func:`adapter_in`)."""
    x_lora = x
    if proj.lora_a is not None and training and proj.dropout > 0:
        x_lora = torch.nn.functional.dropout(x, proj.dropout, training=True)
    return _LoraLinear.apply(x, x_lora, proj, proj.lora_a, proj.lora_b, x.dtype, casts)


def reference_project(x: torch.Tensor, proj: Projection, training: bool) -> torch.Tensor:
    """The same output from plain autograd ops, for tests."""
    out = torch.nn.functional.linear(x, proj.weight(x.dtype), proj.bias(x.dtype))
    if proj.lora_a is None:
        return out
    x_lora = torch.nn.functional.dropout(x, proj.dropout, training=training and proj.dropout > 0)
    return out + (x_lora @ proj.lora_a.to(x.dtype).T) @ proj.lora_b.to(x.dtype).T * proj.scale
