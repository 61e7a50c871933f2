"""A decoder layer's MLP over a long pass, a tile of tokens at a time: its activations never exist whole.

The MLP acts on each token alone, so its output over a pass is the concatenation of its outputs over slices of
the tokens. Forward runs the slices without keeping anything but the input; backward runs each slice again with
gradients and differentiates it, summing the adapter's gradients over the slices. At 128k tokens of an 8B
model the gate, up and gated products alone take 3 x 128k x 14,336 x 2 bytes = 10.5 GiB a layer; in tiles of
``TILE_TOKENS`` they take 0.66 GiB. The price is one more MLP forward per layer, so only passes longer than
``TILE_FROM`` tokens are tiled (the idea is Arctic Long Sequence Training's TiledMLP, arXiv:2506.13996).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kotune.fast.checkpoint import replayed_rng, rng_state

TILE_TOKENS = 8192
"""Tokens per slice."""
TILE_FROM = 16384
"""Passes with more tokens than this run their MLPs in slices (shorter ones fit the untiled activations easily)."""


def _in_slices(run: Callable, h: torch.Tensor) -> torch.Tensor:
    """``run(h)`` computed ``TILE_TOKENS`` rows of ``h`` at a time into one output."""
    flat = h.reshape(-1, h.shape[-1])
    out = None
    for start in range(0, flat.shape[0], TILE_TOKENS):
        y = run(flat[start : start + TILE_TOKENS])
        if out is None:
            out = y.new_empty(flat.shape[0], y.shape[-1])
        out[start : start + TILE_TOKENS] = y
    return out.view(*h.shape[:-1], out.shape[-1])


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, rng: bool, h, *params):
        ctx.run, ctx.params = run, params
        ctx.rng = rng_state(h.device) if rng else None
        ctx.save_for_backward(h)
        with torch.no_grad():
            return _in_slices(run, h)

    @staticmethod
    def backward(ctx, grad_out):
        (h,) = ctx.saved_tensors
        flat, grads = h.reshape(-1, h.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        wanted = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:], strict=True) if need]
        grad_h = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        with replayed_rng(ctx.rng, h.device):  # the slices draw their dropout masks in the same order as forward
            for start in range(0, flat.shape[0], TILE_TOKENS):
                x = flat[start : start + TILE_TOKENS].detach().requires_grad_(grad_h is not None)
                with torch.enable_grad():
                    y = ctx.run(x)
                inputs = ([x] if grad_h is not None else []) + wanted
                got = torch.autograd.grad(y, inputs, grads[start : start + TILE_TOKENS], allow_unused=True)
                if grad_h is not None:
                    grad_h[start : start + TILE_TOKENS] = got[0]
                    got = got[1:]
                sums = [s if g is None else g if s is None else s.add_(g) for s, g in zip(sums, got, strict=True)]
        it = iter(sums)
        grad_params = [next(it) if need else None for need in ctx.needs_input_grad[3:]]
        grad_h = None if grad_h is None else grad_h.view(h.shape)
        return (None, None, grad_h, *grad_params)


def tiled(run: Callable, h: torch.Tensor, params: list[torch.nn.Parameter], rng: bool) -> torch.Tensor:
    """``run(h)`` for a token-wise ``run`` whose trainable tensors are ``params``, a slice of tokens at a time;
    ``rng``: ``run`` draws random numbers (LoRA dropout), replayed when backward runs the slices again."""
    if not torch.is_grad_enabled():  # no backward to come: nothing to keep
        return _in_slices(run, h)
    return _TiledMLP.apply(run, rng, h, *params)
