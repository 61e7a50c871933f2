"""Causal attention for one padded batch or for several rows packed into one sequence, optionally windowed.

Padded batches are right-padded, so a plain causal mask already keeps every real query away from padding
keys (padding queries produce values nobody reads: their labels are -100). Packed rows need a block-diagonal
causal mask: on CUDA PyTorch's variable-length flash attention (``torch.nn.attention.varlen``) runs it in one
kernel from the row boundaries ``cu_seqlens``; elsewhere each row is attended separately, which is exact.

A sliding window of ``W`` (Mistral, Qwen, Gemma 3's local layers, EXAONE 4's) is transformers' definition: a query
at position i sees keys i - W + 1 .. i of its own row, W keys itself included (``masking_utils``:
``kv_idx > q_idx - sliding_window``; flash attention's left window is W - 1). A window no shorter than the
sequence (or the longest packed row) changes nothing and is left out, so those passes keep the causal kernels.
``scale`` (None: 1/sqrt(head dim)) multiplies the scores, as transformers passes ``module.scaling``.
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


def window_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    """``[t, t]`` boolean: query i may see key j when i - window < j <= i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril().triu(1 - window)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: int,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """``q [b, heads, t, d]``, ``k, v [b, kv_heads, t, d]`` -> ``[b, heads, t, d]``."""
    t = q.shape[2]
    causal = window is None or window >= t
    if causal and groups > 1 and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        # flash attention reads the shared key/value heads itself: no [t, heads, d] copies of k and v (kept for
        # backward too), 16 KiB a token at 8B; other kernels would fall back to the O(t^2) one with it
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(t, window, q.device), scale=scale)


def packed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: int,
    bounds: list[int],
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Each packed row ``bounds[i]:bounds[i+1]`` attends causally to itself only (one SDPA call per row)."""
    parts = [
        causal_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], groups, scale, window)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts, dim=2)


@functools.cache
def _varlen_params() -> frozenset[str] | None:
    """The keywords this torch's ``varlen_attn`` takes (they changed between releases), None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_kwargs(scale: float | None, window: int | None) -> dict | None:
    """How this torch's ``varlen_attn`` asks for (windowed) causal attention and a scale; None when it cannot."""
    params = _varlen_params()
    if params is None or (scale is not None and "scale" not in params):
        return None
    kwargs = {} if scale is None else {"scale": scale}
    if window is not None:
        return {**kwargs, "window_size": (window - 1, 0)} if "window_size" in params else None
    if "is_causal" in params:
        return {**kwargs, "is_causal": True}
    if "window_size" in params:
        return {**kwargs, "window_size": (-1, 0)}
    return None


VARLEN_DTYPES = (torch.float16, torch.bfloat16)
"""What the flash kernel behind ``varlen_attn`` computes in; a float32 model's packed rows go one by one (SDPA)."""


def varlen_available(device: torch.device, scale: float | None = None, window: int | None = None) -> bool:
    return device.type == "cuda" and _varlen_kwargs(scale, window) is not None


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: int,
    cu_seqlens: torch.Tensor,
    bounds: list[int],
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Block-diagonal causal attention over packed rows; ``q [1, heads, total, d]`` -> same shape.

    ``cu_seqlens`` (int32, on the device) and ``bounds`` (the same offsets as a list) mark where rows start.
    """
    longest = max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True))
    if window is not None and window >= longest:
        window = None
    if not varlen_available(q.device, scale, window) or q.dtype not in VARLEN_DTYPES:
        return packed_attention_reference(q, k, v, groups, bounds, scale, window)
    from torch.nn.attention.varlen import varlen_attn

    # varlen takes [total, heads, d]; keys/values are repeated so every release's kernel accepts them
    out = varlen_attn(
        q[0].transpose(0, 1).contiguous(),
        repeat_kv(k, groups)[0].transpose(0, 1).contiguous(),
        repeat_kv(v, groups)[0].transpose(0, 1).contiguous(),
        cu_seqlens,
        cu_seqlens,
        longest,
        longest,
        **_varlen_kwargs(scale, window),
    )
    return out.transpose(0, 1).unsqueeze(0)
