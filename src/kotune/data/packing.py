"""Padding-free packing: rows laid end to end in as few sequences as fit.

Two uses. ``train.packing: on`` packs the rows of one optimizer step (``pack_groups``): that changes how a step's
rows are fed, not which rows a step holds or how its loss is normalised (a sum over the step's supervised tokens
either way). ``train.packing: full`` packs the whole training set once (``pack_best_fit``) into sequences of up to
``cutoff_len`` tokens, which then take the place of rows in the data order. Inside a pack every row keeps its own
positions (0, 1, ...) and attends only to itself.
"""

from __future__ import annotations

import bisect

import torch

from kotune.data.batching import epoch_order


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


def pack_best_fit(lengths: list[int], budget: int, seed: int) -> list[list[int]]:
    """Indices of ``lengths`` packed best-fit-decreasing into sequences of at most ``budget`` tokens.

    Longest row first, each into the sequence it fills the most (the least room that still holds it), else a new
    one; rows of equal length are taken in a seeded order, so the packing is a function of (lengths, seed). A row
    longer than ``budget`` gets a sequence of its own. Every index appears exactly once.
    """
    shuffled = epoch_order(len(lengths), seed, -1)  # the packing's own draw, apart from every epoch's order
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, pack index), sorted: the best fit is the first that holds a row
    for i in sorted(shuffled, key=lambda j: -lengths[j]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, p = free.pop(at)
            packs[p].append(i)
            bisect.insort(free, (room - lengths[i], p))
        else:
            packs.append([i])
            bisect.insort(free, (budget - lengths[i], len(packs) - 1))
    return packs


def pack_windows(lengths: list[int], budget: int, seed: int, window: int) -> list[list[int]]:
    """``pack_best_fit`` within windows: the rows in a seeded order, cut into windows of ``window`` rows, each window
    packed best fit decreasing on its own. For sets too large to pack at once (``data.streaming``): the work and
    memory of one packing are a window's, and at most one sequence a window is left emptier than across the set."""
    order = epoch_order(len(lengths), seed, -2)  # its own draw, apart from pack_best_fit's and every epoch's
    packs: list[list[int]] = []
    for start in range(0, len(order), window):
        rows = order[start : start + window]
        packs += [[rows[j] for j in p] for p in pack_best_fit([lengths[i] for i in rows], budget, seed + start)]
    return packs


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total, total]`` boolean mask: position i may attend to j when both are in one row and j <= i."""
    positions = torch.arange(total, device=cu_seqlens.device)
    row = torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)
    return (row[:, None] == row[None, :]) & (positions[:, None] >= positions[None, :])
