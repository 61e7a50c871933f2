"""Batching: a seeded data order per epoch, and collation as a pure function."""

from __future__ import annotations

import numpy as np
import torch

from kotune.data.examples import IGNORE, Example


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order rows are visited in an epoch; a function of (seed, epoch) only, so a resumed run sees the same."""
    return epoch_order_array(n, seed, epoch).tolist()


def epoch_order_array(n: int, seed: int, epoch: int) -> np.ndarray:
    """``epoch_order`` as an int64 array (8 bytes a row, where the list costs about 36)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).numpy()


def length_grouped_order(lengths: list[int], seed: int, epoch: int, group: int) -> list[int]:
    """Shuffle, then sort by length inside windows of ``group`` rows: similar lengths share batches."""
    order = epoch_order(len(lengths), seed, epoch)
    windows = [order[i : i + group] for i in range(0, len(order), group)]
    return [i for w in windows for i in sorted(w, key=lambda j: -lengths[j])]


def collate(batch: list[Example], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad ids with ``pad_id`` and labels with -100; the attention mask marks real tokens."""
    longest = max(len(e.input_ids) for e in batch)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(batch: list[Example]) -> dict[str, torch.Tensor]:
    """Rows laid end to end in one sequence: ``[1, total]`` ids and labels, per-row positions, row offsets.

    Each row's first label is set to -100: it would otherwise be the target of the previous row's last
    token. On its own a row's first label is never a target, so the loss is the unpacked one.
    """
    ids = [t for e in batch for t in e.input_ids]
    labels, positions, offsets = [], [], [0]
    for e in batch:
        labels += [IGNORE] + list(e.labels[1:])
        positions += range(len(e.input_ids))
        offsets.append(offsets[-1] + len(e.input_ids))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seqlens": torch.tensor(offsets, dtype=torch.int32),
    }


def to_device(value, device: torch.device):
    """A batch value on ``device`` (anything not a tensor as it is); host-to-GPU copies go through pinned
    memory and do not wait for the GPU (a copy from pageable memory waits for all work queued before it)."""
    if not isinstance(value, torch.Tensor):
        return value
    if device.type != "cuda" or value.device.type != "cpu":
        return value.to(device)
    return value.pin_memory().to(device, non_blocking=True)
