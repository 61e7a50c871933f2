"""The decoder's elementwise pieces: RMSNorm (Llama's, Gemma's), rotary embedding, SiLU- or GELU-gated product.

Each has a plain PyTorch form (the reference, and what runs on CPU) that follows transformers' modeling code
(Llama's, Gemma 3's) operation by operation. On CUDA, when ``liger-kernel`` is importable, fused Triton kernels
from it take their place (one kernel each instead of five to ten); ``tests/test_fast_ops.py`` compares both
forms, outputs and gradients, on the GPU.
"""

from __future__ import annotations

import torch

from kotune.fast.cuda import cuda_with


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: statistics in fp32, normalised value cast back, then times the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gemma_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Gemma3RMSNorm: normalised and times (1 + weight), all in fp32, cast back once."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of ``q [b, heads, t, d]`` and ``k`` with ``cos, sin [b, t, d]`` (Llama's half rotation)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' ``gelu_pytorch_tanh`` of the gate times the up projection (Gemma's MLP)."""
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def liger_available() -> bool:
    """True when liger-kernel and a CUDA device are there (checked once)."""
    return cuda_with(
        "liger_kernel.ops.rms_norm", "liger_kernel.ops.rope", "liger_kernel.ops.swiglu", "liger_kernel.ops.geglu"
    )


class Ops:
    """The functions the fast decoder calls, fused on CUDA when asked and available."""

    def __init__(self, fused: bool):
        self.fused = fused and liger_available()

    # ``in_place``: the fused backward writes the input's gradient over the output's. That is safe only where no
    # one else reads the output's gradient: not for a norm whose output is added to the residual stream (Gemma 3's
    # and EXAONE 4's norms after attention and MLP), where autograd hands the same gradient to the residual too.
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, in_place: bool = True) -> torch.Tensor:
        if self.fused and x.is_cuda:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", in_place)
        return rms_norm_reference(x, weight, eps)

    def gemma_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, in_place: bool = True) -> torch.Tensor:
        if self.fused and x.is_cuda:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            # offset 1: times (1 + weight); "gemma" casting: everything in fp32, one cast back
            return LigerRMSNormFunction.apply(x, weight, eps, 1.0, "gemma", in_place)
        return gemma_rms_norm_reference(x, weight, eps)

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if self.fused and q.is_cuda:
            from liger_kernel.ops.rope import LigerRopeFunction

            return LigerRopeFunction.apply(q, k, cos, sin)
        return rope_reference(q, k, cos, sin)

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.fused and gate.is_cuda:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply(gate, up)
        return silu_mul_reference(gate, up)

    def gelu_tanh_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.fused and gate.is_cuda:
            from liger_kernel.ops.geglu import LigerGELUMulFunction

            return LigerGELUMulFunction.apply(gate, up)
        return gelu_tanh_mul_reference(gate, up)
