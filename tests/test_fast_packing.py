"""Packing: which rows share a sequence, what the packed batch holds, and that a packed run trains the same steps."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kotune.data.batching import collate_packed
from kotune.data.examples import IGNORE, Example
from kotune.data.packing import pack_groups


@pytest.mark.parametrize("seed", range(5))
def test_every_row_once_and_packs_within_budget(seed):
    rnd = random.Random(seed)
    lengths = [rnd.randint(1, 300) for _ in range(rnd.randint(1, 40))]
    budget = 400
    packs = pack_groups(lengths, budget)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= budget for p in packs)
    # first fit, longest first, never needs more than twice the lower bound
    assert len(packs) <= 2 * -(-sum(lengths) // budget)


def test_row_longer_than_budget_goes_alone():
    assert pack_groups([10, 50, 5], budget=20) == [[1], [0, 2]]


def test_packed_batch_by_hand():
    rows = [Example(0, [5, 6, 7], [IGNORE, 6, 7]), Example(1, [8, 9], [8, 9])]
    batch = collate_packed(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    # the second row's first label would be the first row's last target: masked, as it is never a target alone
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5] and batch["cu_seqlens"].dtype == torch.int32


def _losses(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return {r["step"]: (r["loss"], r["tokens"]) for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
def test_packed_run_trains_the_same_steps(tmp_path, tiny_train_config):
    """Same rows per step, same normalisation: packing on or off gives the same per-step losses."""
    from kotune.training.recipe import train

    overrides = {
        "lora.dropout": 0.0,
        "train.micro_batch_size": 2,
        "train.save_steps": 100,
        "train.eval_steps": 100,
        "train.max_steps": 4,
    }
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        train(tiny_train_config(out, {**overrides, "train.packing": packing}))
        runs[packing] = _losses(out)
    assert runs[True].keys() == runs[False].keys() == {1, 2, 3, 4}
    for step, (loss, tokens) in runs[False].items():
        packed_loss, packed_tokens = runs[True][step]
        assert packed_tokens == tokens
        assert packed_loss == pytest.approx(loss, rel=1e-5)
