"""Gradient checkpointing of decoder layers, with each layer's input optionally parked in host memory.

A checkpointed layer runs forward without keeping its activations; backward runs it again from its input,
then differentiates. Only the inputs stay alive between the passes (seq x hidden per layer: 16 MiB at 2,048
tokens for an 8B model, 0.5 GiB over 32 layers). With offloading, those inputs go to pinned host memory on a
side CUDA stream during forward and come back one layer ahead during backward, so the copies overlap the
layers' compute instead of adding to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

PIECE_BYTES = 64 << 20
"""Host buffers are pinned in pieces of this size (a power of two): torch's pinned-memory allocator rounds every
request up to the next power of two, which for one buffer a layer costs up to twice the host memory (a
344,064-token pass: 4 GiB pinned per layer for 2.7 GiB of input, 128 GiB for 32 layers)."""


def pieces(numel: int, element_size: int) -> list[int]:
    """Element counts of the pinned pieces holding ``numel`` elements: whole ``PIECE_BYTES`` pieces, then the rest
    (under one piece, so rounding it up wastes less than ``PIECE_BYTES``)."""
    per = PIECE_BYTES // element_size
    whole, rest = divmod(numel, per)
    return [per] * whole + ([rest] if rest else [])


class ActivationStore:
    """Keeps each layer's input for backward: as is, or in pinned host memory (CUDA, ``offload=True``)."""

    def __init__(self, device: torch.device, offload: bool):
        self.offload = offload and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.offload else None
        self._host: dict[int, list[torch.Tensor]] = {}
        self._handles: dict[int, tuple] = {}
        self._ahead: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}

    def _spans(self, index: int, x: torch.Tensor):
        """(host piece, flat slice of ``x``) pairs covering ``x``, the pieces of layer ``index`` (grown if short)."""
        flat, sizes = x.view(-1), pieces(x.numel(), x.element_size())
        held = self._host.get(index, [])
        if len(held) < len(sizes) or any(h.numel() < n for h, n in zip(held, sizes, strict=False)):
            held = [torch.empty(n, dtype=x.dtype, pin_memory=True) for n in sizes]
            self._host[index] = held
        start = 0
        for host, n in zip(held, sizes, strict=False):
            yield host[:n], flat[start : start + n]
            start += n

    def put(self, index: int, x: torch.Tensor):
        """Start keeping layer ``index``'s input ``x``; returns the handle ``get`` takes."""
        if not self.offload:
            return x
        x = x.contiguous()
        self.stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.stream):
            for host, part in self._spans(index, x):
                host.copy_(part, non_blocking=True)
        x.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self._ahead.pop(index, None)
        self._handles[index] = (x.shape, x.dtype, x.device)
        return self._handles[index]

    def get(self, index: int, handle) -> torch.Tensor:
        """The kept tensor, on the device; also starts bringing back layer ``index - 1``'s input."""
        if not self.offload:
            return handle
        x, ready = self._ahead.pop(index) if index in self._ahead else self._fetch(index, handle)
        torch.cuda.current_stream(x.device).wait_event(ready)
        if index - 1 in self._handles:  # overlaps the copy with this layer's recompute and backward
            self._ahead[index - 1] = self._fetch(index - 1, self._handles[index - 1])
        return x

    def _fetch(self, index: int, handle) -> tuple[torch.Tensor, torch.cuda.Event]:
        shape, dtype, device = handle
        x = torch.empty(shape, dtype=dtype, device=device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.stream):
            for host, part in self._spans(index, x):
                part.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return x, ready


def rng_state(device: torch.device):
    """The torch RNG state a recomputation must start from to draw the same dropout masks (CPU, and ``device``'s)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed_rng(state, device: torch.device):
    """A block that draws from ``state`` (from ``rng_state``; None: the RNG as it is), the RNG restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=state is not None):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], device)
        yield


def _gathered(run):
    """``run.gathered()`` when it has one (a decoder layer that may be sharded), else nothing to enter."""
    gathered = getattr(run, "gathered", None)
    return gathered() if gathered is not None else contextlib.nullcontext()


class _Checkpointed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, extra, store: ActivationStore, index: int, rng: bool, x, *params):
        ctx.run, ctx.extra, ctx.store, ctx.index = run, extra, store, index
        ctx.rng = rng_state(x.device) if rng else None
        ctx.handle = store.put(index, x)
        with _gathered(run):
            return run(x, *extra)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.store.get(ctx.index, ctx.handle).detach().requires_grad_(ctx.needs_input_grad[5])
        wanted = [x] if x.requires_grad else []
        params = [p for p, need in zip(ctx.run.parameters(), ctx.needs_input_grad[6:], strict=True) if need]
        with _gathered(ctx.run):  # the weights whole for the recomputation and its backward alike
            with replayed_rng(ctx.rng, x.device), torch.enable_grad():  # the same dropout masks as in forward
                out = ctx.run(x, *ctx.extra)
            grads = torch.autograd.grad(out, wanted + params, grad_out, allow_unused=True)
        grad_x = grads[0] if x.requires_grad else None
        it = iter(grads[len(wanted) :])
        grad_params = [next(it) if need else None for need in ctx.needs_input_grad[6:]]
        return (None, None, None, None, None, grad_x, *grad_params)


def checkpointed(
    run: Callable, x: torch.Tensor, extra: tuple, store: ActivationStore, index: int, rng: bool
) -> torch.Tensor:
    """``run(x, *extra)`` for training without keeping its activations; ``run.parameters()`` are its trainables.

    ``extra`` is passed again unchanged when backward recomputes; ``rng=True`` replays the random state there
    so dropout draws the same masks.
    """
    return _Checkpointed.apply(run, extra, store, index, rng, x, *run.parameters())
