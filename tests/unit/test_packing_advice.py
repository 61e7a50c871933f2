"""When ``kotune train`` suggests ``train.packing: full``: the decision on hand-made feeds, and on rows planned for a
GPU (the plan's time) or for the CPU (tokens computed, padding included)."""

from __future__ import annotations

from kotune.config_load import load_config
from kotune.plan import estimate as est
from kotune.plan.gpus import gpu_named
from kotune.plan.packing_advice import MATERIAL, Feed, full_packing_advice, packing_advice
from kotune.plan.shape import ModelShape

LLAMA3_8B = ModelShape(
    hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tied_embeddings=False
)


def config(**values):
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def feed(seconds: float | None, rows=100, tokens=10_000, padding=0, steps=12.5, per_step=8.0, fits=True) -> Feed:
    return Feed(rows, tokens, padding, seconds, steps, per_step, fits)


def test_a_row_materially_faster_packed_full_is_suggested_with_what_it_changes():
    now, full = feed(60.0), feed(40.0, steps=2.0, per_step=50.0)
    line = full_packing_advice(config(**{"data.cutoff_len": 2048}), now, full, train_rows=100)
    assert line is not None and line.startswith("kotune: train.packing=full would train these rows ~1.5x faster")
    assert "60 s an epoch now, 40 s packed full" in line
    assert "sequences of up to 2048 tokens" in line and "attends only to itself" in line
    assert "~50 rows instead of 8" in line and "2 steps instead of 12.5" in line
    assert "padding" not in line  # the run feeds none now


def test_a_small_gain_a_run_packed_full_already_or_one_that_would_not_fit_gets_no_suggestion():
    now = feed(100.0)
    just_below = feed(100.0 / (MATERIAL - 0.01))
    assert full_packing_advice(config(), now, just_below, 100) is None
    assert full_packing_advice(config(), now, feed(100.0 / (MATERIAL + 0.01)), 100) is not None
    assert full_packing_advice(config(**{"train.packing": "full"}), now, feed(10.0), 100) is None
    assert full_packing_advice(config(), now, feed(10.0, fits=False), 100) is None


def test_without_a_plan_the_tokens_computed_a_row_decide_and_the_padding_is_named():
    now = feed(None, tokens=30_000, padding=20_000)  # 300 tokens a row, two thirds of them padding
    line = full_packing_advice(config(), now, feed(None, tokens=10_000), 100)
    assert line is not None and "with 3.0x fewer tokens computed a row; 67% of the tokens" in line
    assert full_packing_advice(config(), feed(None), feed(None), 100) is None


def test_short_rows_on_a_gpu_are_told_long_rows_are_not():
    gpu = gpu_named("H200")
    for lengths, suggested in (([120, 90, 200, 150] * 250, True), ([3000, 3900, 3500, 2800] * 60, False)):
        cfg = config(**{"data.cutoff_len": 4096})  # packing auto on the fast path: no padding, one step a pass
        plan = est.estimate(LLAMA3_8B, cfg, lengths, gpu, fast=True)
        line = packing_advice(cfg, lengths, 1, plan, LLAMA3_8B)
        assert (line is not None) == suggested, line
        if suggested:  # 8 rows a step now; about 4096 / 140 rows a sequence, 8 sequences a step packed full
            assert "instead of 8 and an epoch has" in line and "125 steps an epoch" not in line


def test_on_the_cpu_padded_micro_batches_of_uneven_rows_are_told():
    lengths = [20, 400] * 64  # a micro-batch of 2 that draws one of each pads the short row to 400 tokens
    cfg = config(**{"train.micro_batch_size": 2, "data.cutoff_len": 1024, "train.pad_to_multiple_of": 1})
    passes = est.run_passes(lengths, cfg, packed=False)
    padding = sum(p.tokens - sum(lengths[i] for i in p.rows) for p in passes) / sum(p.tokens for p in passes)
    assert 0.2 < padding < 380 / 800  # mixed pairs pad, the others do not
    line = packing_advice(cfg, lengths, 1)
    assert line is not None and f"{padding:.0%} of the tokens the passes compute now are padding" in line
    assert f"with {1 / (1 - padding):.1f}x fewer tokens computed a row" in line  # the same rows, without padding
    assert packing_advice(config(**{"train.packing": "on"}), lengths, 1) is None  # no padding, same tokens
    assert packing_advice(config(**{"train.objective": "dpo"}), lengths, 1) is None


def test_on_the_cpu_what_cannot_be_told_is_not_computed(monkeypatch):
    """Packed passes have no padding to save: not simulated. Padding below the threshold: the set is not packed."""
    from kotune.data import order
    from kotune.plan import packing_advice as advice

    def refuse(*args, **kwargs):
        raise AssertionError("computed for advice that cannot be given")

    lengths = [20, 400] * 64
    with monkeypatch.context() as mp:
        mp.setattr(advice, "run_passes", refuse)
        assert packing_advice(config(**{"train.packing": "on"}), lengths, 1) is None
    monkeypatch.setattr(order, "sequences", refuse)
    even = config(**{"train.micro_batch_size": 2, "train.pad_to_multiple_of": 1})
    assert packing_advice(even, [100, 110] * 64, 1) is None  # under 10% padding
