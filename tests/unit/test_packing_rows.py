"""Packing rows end to end: every row once within budget, positions restarting per row, a block-diagonal causal
mask (no attention across rows), labels intact, and the loss of a pack equal to its rows' losses apart."""

from __future__ import annotations

import random

import pytest
import torch

from kotune.data.batching import collate, collate_packed
from kotune.data.examples import IGNORE, Example
from kotune.data.packing import block_causal_mask, pack_groups
from kotune.training.build import loss_sum

ROWS = [
    Example(10, [257, 1, 2, 3, 4], [IGNORE, IGNORE, IGNORE, 3, 4]),
    Example(11, [257, 5, 6], [IGNORE, 6, 6]),
    Example(12, [257, 7, 8, 9], [IGNORE, IGNORE, 8, 258]),
]


def test_positions_restart_and_offsets_mark_each_row():
    batch = collate_packed(ROWS)
    assert batch["input_ids"].tolist() == [[257, 1, 2, 3, 4, 257, 5, 6, 257, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 12]


def test_labels_are_the_rows_own_with_each_first_label_masked():
    batch = collate_packed(ROWS)
    # a row's first label would be the target of the previous row's last token: it is masked, nothing else changes
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 3, 4, IGNORE, 6, 6, IGNORE, IGNORE, 8, 258]]
    targets = (batch["labels"][0, 1:] != IGNORE).sum().item()
    assert targets == sum((torch.tensor(e.labels[1:]) != IGNORE).sum().item() for e in ROWS)


def test_block_causal_mask_keeps_rows_apart():
    mask = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    assert mask.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


@pytest.mark.parametrize("seed", range(3))
def test_pack_groups_places_every_row_once_within_the_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 30))]
    packs = pack_groups(lengths, 64)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 64 for p in packs)
    assert all(p == sorted(p) for p in packs)


def test_a_row_over_the_budget_gets_a_pack_of_its_own():
    assert pack_groups([3, 9, 4], budget=8) == [[1], [0, 2]]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def packable_rows(seed: int) -> list[Example]:
    """Rows of random bytes behind BOS, each with a masked prompt and a trained response."""
    rng = random.Random(seed)
    rows = []
    for row in range(4):
        ids = [257] + [rng.randrange(256) for _ in range(rng.randint(4, 12))]
        prompt = rng.randint(1, len(ids) - 1)
        rows.append(Example(row, ids, [IGNORE] * prompt + ids[prompt:]))
    return rows


@torch.no_grad()
def test_a_packed_batch_has_the_loss_of_its_rows_apart(tiny_model):
    rows = packable_rows(0)
    apart = sum(loss_sum(tiny_model, collate([e], pad_id=256)).item() for e in rows)
    packed = loss_sum(tiny_model, collate_packed(rows)).item()
    assert packed == pytest.approx(apart, rel=1e-5)
    # the test can see a leak: the pack read as one row (positions running on, so attention crosses the rows)
    # moves the loss far outside that tolerance with these rows and this model's small random weights
    leaky = collate_packed(rows)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
    assert abs(loss_sum(tiny_model, leaky).item() - apart) > 2e-4 * apart


@torch.no_grad()
def test_padded_batches_have_the_loss_of_their_rows_apart(tiny_model):
    rows = packable_rows(1)
    apart = sum(loss_sum(tiny_model, collate([e], pad_id=256)).item() for e in rows)
    padded = loss_sum(tiny_model, collate(rows, pad_id=256, pad_to_multiple_of=8)).item()
    assert padded == pytest.approx(apart, rel=1e-5)
