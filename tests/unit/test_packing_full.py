"""``train.packing: full``: the whole training set packed once, best fit decreasing, into sequences of up to
``cutoff_len`` tokens, shuffled per epoch, ``micro_batch_size`` sequences a pass. Every row once an epoch, no
sequence over the cutoff, rows kept apart inside a pass (labels, positions, attention), the 2-process split, and the
step count the run announces and runs."""

from __future__ import annotations

import json
import random
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import write_jsonl

from kotune.config_load import load_config
from kotune.data.batching import collate
from kotune.data.examples import IGNORE, Example
from kotune.data.order import DataOrder, Epochs, epoch_units, step_passes, step_units, total_steps, unit_count
from kotune.data.packing import pack_best_fit, pack_groups
from kotune.training.build import loss_sum
from kotune.training.objective import SupervisedObjective
from tests.unit.test_pinned_run import kotune_train, write_config


def config(**values):
    return load_config(None, [f"{k}={v}" for k, v in {"train.packing": "full", **values}.items()])


def random_lengths(seed: int, n: int = 60, cutoff: int = 64) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(2, cutoff) for _ in range(n)]


def test_best_fit_fills_better_than_first_fit():
    # longest first: 22 | 15, 9 | then 5 goes to the fuller pack (room 6) under best fit, to the first (room 8) under
    # first fit, which then has no room left for the second 4
    lengths = [5, 9, 4, 4, 22, 15]
    assert len(pack_groups(lengths, 30)) == 3
    assert sorted(sorted(lengths[i] for i in p) for p in pack_best_fit(lengths, 30, seed=0)) == [[4, 4, 22], [5, 9, 15]]


@pytest.mark.parametrize("seed", range(3))
def test_every_row_once_an_epoch_and_no_sequence_over_the_cutoff(seed):
    lengths = random_lengths(seed)
    cfg = config(**{"data.cutoff_len": 64, "train.micro_batch_size": 1, "train.gradient_accumulation_steps": 1})
    per_epoch = total_steps(cfg, lengths, 1)[1]
    assert per_epoch == unit_count(lengths, cfg) < len(lengths)  # several rows a sequence: fewer steps an epoch
    epochs = []
    for epoch in range(2):
        seqs = [step_units(Epochs(lengths, cfg), epoch * per_epoch + m)[0] for m in range(per_epoch)]
        assert sorted(i for s in seqs for i in s) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in s) <= 64 for s in seqs)
        epochs.append(seqs)
    # packed once, shuffled per epoch: the same sequences in another order
    assert sorted(map(sorted, epochs[0])) == sorted(map(sorted, epochs[1])) and epochs[0] != epochs[1]
    assert epochs[0] == epoch_units(lengths, cfg, 0)  # a pure function of (config, lengths, position)


def test_a_pass_is_micro_batch_size_sequences_and_the_plan_sees_the_same():
    from kotune.plan import estimate as est

    lengths = random_lengths(4, n=40, cutoff=128)
    rows = [Example(i, list(range(n)), list(range(n))) for i, n in enumerate(lengths)]
    cfg = config(**{"data.cutoff_len": 128, "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2})
    steps = total_steps(cfg, lengths, 1)[0]
    order = DataOrder(lengths, cfg, 0, 1, packed=True)
    objective = SupervisedObjective(None, SimpleNamespace(pad_token_id=0), cfg, packed=True)

    def window(micro_step):  # the batches a training step feeds, collated as the loop collates them
        return [objective.collate([rows[i] for i in p], train=True) for p in order.passes(micro_step)]

    for step in range(steps):
        seqs = step_units(Epochs(lengths, cfg), step * 2)
        assert len(seqs) == 4
        passes = order.passes(step * 2)
        assert passes == [seqs[0] + seqs[1], seqs[2] + seqs[3]]
        assert all(b["input_ids"].numel() <= 2 * 128 for b in window(step * 2))
    planned = est.run_passes(lengths, cfg, packed=True)
    fed = [b["input_ids"].numel() for step in range(steps) for b in window(step * 2)]
    assert [p.tokens for p in planned] == fed


@pytest.mark.parametrize("micro_step", [0, 3, 9, 24])
def test_two_processes_split_each_step_into_whole_sequences_once(micro_step):
    lengths = random_lengths(5, n=80)
    cfg = config(**{"data.cutoff_len": 64, "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 3})
    seqs = step_units(Epochs(lengths, cfg), micro_step)
    ranks = [step_passes(Epochs(lengths, cfg), micro_step, rank, 2, packed=True) for rank in range(2)]
    fed = [i for passes in ranks for p in passes for i in p]
    assert sorted(fed) == sorted(i for s in seqs for i in s)  # every row of the step, on exactly one process
    for passes in ranks:
        assert passes and all(len(p) > 0 for p in passes)
        mine = {tuple(s) for s in seqs if set(s) <= {i for p in passes for i in p}}
        assert sum(len(s) for s in mine) == sum(len(p) for p in passes)  # made of whole sequences
        assert len(passes) == -(-len(mine) // 2)  # micro_batch_size sequences a pass


def rows_of(seed: int, n: int = 6) -> list[Example]:
    """Rows of random bytes behind BOS, each with a masked prompt and a trained response."""
    rng = random.Random(seed)
    rows = []
    for row in range(n):
        ids = [257] + [rng.randrange(256) for _ in range(rng.randint(4, 14))]
        prompt = rng.randint(1, len(ids) - 1)
        rows.append(Example(row, ids, [IGNORE] * prompt + ids[prompt:]))
    return rows


def a_full_pass(rows: list[Example]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The first pass of a ``packing: full`` run over ``rows`` (cutoff 24: two or three rows a sequence, two
    sequences a pass), and the rows in it in their order."""
    cfg = config(**{"data.cutoff_len": 24, "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1})
    order = DataOrder([len(r.input_ids) for r in rows], cfg, 0, 1, packed=True)
    (ids,) = order.passes(0)
    batch = SupervisedObjective(None, SimpleNamespace(pad_token_id=256), cfg, packed=True).collate(
        [rows[i] for i in ids], train=True
    )
    assert len(ids) > 2  # rows of more than one sequence in one pass
    return batch, ids


def test_a_packed_pass_has_each_rows_own_labels_and_positions():
    rows = rows_of(0)
    batch, ids = a_full_pass(rows)
    bounds = batch["cu_seqlens"].tolist()
    assert len(bounds) == len(ids) + 1
    for k, i in enumerate(ids):
        alone = collate([rows[i]], pad_id=256)
        a, b = bounds[k], bounds[k + 1]
        assert batch["input_ids"][0, a:b].tolist() == alone["input_ids"][0].tolist()
        assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))
        # the row's first label is never a target on its own; in the pack it is masked, the rest is the row's
        assert batch["labels"][0, a + 1 : b].tolist() == alone["labels"][0, 1:].tolist()
        assert batch["labels"][0, a].item() == IGNORE


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@torch.no_grad()
def test_a_packed_pass_gives_each_row_its_loss_alone(tiny_model):
    rows = rows_of(1)
    batch, ids = a_full_pass(rows)
    bounds = batch["cu_seqlens"].tolist()
    leaky = {**batch, "position_ids": torch.arange(bounds[-1])[None]}  # read as one row: attention crosses rows
    moved = 0.0
    for k, i in enumerate(ids):
        only = batch["labels"].clone()  # the pass's loss on row i's targets alone
        only[0, : bounds[k]] = IGNORE
        only[0, bounds[k + 1] :] = IGNORE
        alone = loss_sum(tiny_model, collate([rows[i]], pad_id=256)).item()
        assert loss_sum(tiny_model, {**batch, "labels": only}).item() == pytest.approx(alone, rel=1e-5), i
        moved = max(moved, abs(loss_sum(tiny_model, {**leaky, "labels": only}).item() - alone) / alone)
    # the test can see a leak: with attention across rows, some row's loss moves far outside the tolerance
    assert moved > 1e-4


def test_a_full_packing_run_runs_the_steps_it_announces_and_resumes_mid_epoch_to_the_same_metrics(
    tmp_path, tiny_model_dir, capsys
):
    """The pinned tiny run with ``packing: full`` for two epochs: it runs the steps its log announces; then its
    checkpoints after step 2 are lost, and the resume (mid first epoch, across the epoch boundary) writes the
    same metrics.jsonl and adapter."""
    config = write_config(
        tmp_path,
        tiny_model_dir,
        **{"train.packing": "full", "data.cutoff_len": 512, "train.max_steps": None, "train.num_epochs": 2},
    )
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}. " * (i % 4)} for i in range(40)
    ]
    write_jsonl(tmp_path / "rows.jsonl", rows)  # 32 training rows of 150 to 200 tokens: two or three a sequence
    kotune_train(config)
    (said,) = [line for line in capsys.readouterr().out.splitlines() if "steps (packing full)" in line]
    run = tmp_path / "run"
    metrics = (run / "metrics.jsonl").read_bytes()
    records = [json.loads(line) for line in metrics.decode("utf-8").splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    packed = re.search(r"32 rows packed into (\d+) sequences", said)
    assert packed and int(packed[1]) < 16, said
    announced = (int(packed[1]) // 2) * 2 // 2  # micro-batches of 2 sequences an epoch, 2 epochs, 2 a step
    assert said.endswith(f" {announced} steps (packing off or on: 4 rows a step)") and announced >= 4, said
    assert steps == list(range(1, announced + 1))
    assert [r["epoch"] for r in records if "loss" in r][-1] == pytest.approx(2.0, abs=0.5)

    adapter = (run / "adapter_model.safetensors").read_bytes()
    (run / "run_summary.json").unlink()  # the run did not finish
    for folder in run.glob("checkpoint-*"):
        if folder.name != "checkpoint-2":  # back to step 2: mid first epoch, the next steps cross into the second
            shutil.rmtree(folder)
    kotune_train(config, "--resume")
    said = capsys.readouterr()
    assert "checkpoint-2" in said.out + said.err  # it did resume, from there
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "adapter_model.safetensors").read_bytes() == adapter
