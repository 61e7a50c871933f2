"""Causal attention for one padded batch or for several rows packed into one sequence.

Padded batches are right-padded, so a plain causal mask already keeps every real query away from padding
keys (padding queries produce values nobody reads: their labels are -100). Packed rows need a block-diagonal
causal mask: on CUDA PyTorch's variable-length flash attention (``torch.nn.attention.varlen``) runs it in one
kernel from the row boundaries ``cu_seqlens``; elsewhere each row is attended separately, which is exact.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[b, kv_heads, t, d]`` -> ``[b, kv_heads * groups, t, d]``, each key/value head shared by ``groups`` queries."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """``q [b, heads, t, d]``, ``k, v [b, kv_heads, t, d]`` -> ``[b, heads, t, d]``."""
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)


def packed_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, bounds: list[int]
) -> torch.Tensor:
    """Each packed row ``bounds[i]:bounds[i+1]`` attends causally to itself only (one SDPA call per row)."""
    parts = [
        causal_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], groups)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts, dim=2)


@functools.cache
def _varlen_kwargs() -> dict | None:
    """How this torch's ``varlen_attn`` asks for a causal mask (the keyword changed between releases)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        return {"is_causal": True}
    if "window_size" in params:
        return {"window_size": (-1, 0)}
    return None


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and _varlen_kwargs() is not None


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, cu_seqlens: torch.Tensor, bounds: list[int]
) -> torch.Tensor:
    """Block-diagonal causal attention over packed rows; ``q [1, heads, total, d]`` -> same shape.

    ``cu_seqlens`` (int32, on the device) and ``bounds`` (the same offsets as a list) mark where rows start.
    """
    if not varlen_available(q.device):
        return packed_attention_reference(q, k, v, groups, bounds)
    from torch.nn.attention.varlen import varlen_attn

    longest = max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True))
    # varlen takes [total, heads, d]; keys/values are repeated so every release's kernel accepts them
    out = varlen_attn(
        q[0].transpose(0, 1).contiguous(),
        repeat_kv(k, groups)[0].transpose(0, 1).contiguous(),
        repeat_kv(v, groups)[0].transpose(0, 1).contiguous(),
        cu_seqlens,
        cu_seqlens,
        longest,
        longest,
        **_varlen_kwargs(),
    )
    return out.transpose(0, 1).unsqueeze(0)
