"""Padding-free packing: the rows of one optimizer step laid end to end in as few sequences as fit.

Packing changes how a step's rows are fed, not which rows a step holds or how its loss is normalised (the
loss is a sum over the step's supervised tokens either way), so a packed run computes the same steps as an
unpacked one. Inside a pack every row keeps its own positions (0, 1, ...) and attends only to itself.
"""

from __future__ import annotations

import torch


def pack_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into packs of at most ``budget`` tokens (first fit, longest first).

    A row longer than ``budget`` gets a pack of its own. Every index appears exactly once.
    """
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for p, free in enumerate(room):
            if lengths[i] <= free:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(budget - lengths[i])
    return [sorted(p) for p in packs]


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total, total]`` boolean mask: position i may attend to j when both are in one row and j <= i."""
    positions = torch.arange(total, device=cu_seqlens.device)
    row = torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)
    return (row[:, None] == row[None, :]) & (positions[:, None] >= positions[None, :])
