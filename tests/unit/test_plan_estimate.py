"""``kotune plan``'s estimate, offline: its arithmetic against hand-computed figures, the passes it plans against
the ones training feeds, and the settings ``--fit`` chooses under a fake memory budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kotune.config_load import load_config
from kotune.data.examples import Example
from kotune.data.order import DataOrder
from kotune.plan import estimate as est
from kotune.plan import gate
from kotune.plan.gpus import GiB, Gpu, UnknownGpu, gpu_named
from kotune.plan.shape import ModelShape
from kotune.training.objective import SupervisedObjective

LLAMA3_8B = ModelShape(
    hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tied_embeddings=False
)


def config(**values):
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_the_8b_shape_counts_by_hand():
    # q, o: 4096 x 4096; k, v: 4096 x 1024 (8 of 32 heads); gate, up, down: 4096 x 14336; 32 layers
    assert LLAMA3_8B.linear_params() == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) == 6_979_321_856
    assert LLAMA3_8B.lora_params(["q_proj", "k_proj", "v_proj", "o_proj"], 16) == 32 * 16 * (8192 + 5120 + 5120 + 8192)
    assert LLAMA3_8B.lora_params("all-linear", 8) == 32 * 8 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)


def test_memory_parts_by_hand():
    cfg = config(**{"lora.r": 16, "train.optimizer": "paged_adamw_8bit"})
    parts = list(est.memory_parts(LLAMA3_8B, cfg, 1000, fast=True).values())
    # NF4: 4 bits + one 8-bit absmax per 64 weights + one fp32 per 256 absmax blocks
    assert parts[0] == 6_979_321_856 // 2 + 6_979_321_856 // 64 + 6_979_321_856 * 4 // (64 * 256) == 3_600_416_768
    assert parts[1] == 128256 * 4096 * 2 + 65 * 4096 * 2  # lm_head and 65 norms in bf16; embeddings on the host
    assert parts[2] == 13_631_488 * (4 + 4 + 2)  # fp32 weights and gradients, two 8-bit moments
    assert parts[3] == int(est.OMEGA * 4096 * 14336 * 2)
    assert parts[4] == int(est.KAPPA * 2 * (4 * 4096 + 3 * 14336) * 1000)
    plain = est.memory_parts(LLAMA3_8B, cfg, 1000, fast=False)
    assert plain["unquantized weights (lm_head, embeddings on GPU, norms)"] == parts[1] + 128256 * 4096 * 2
    assert plain["logits (bf16, fp32 copy, gradient)"] == 1000 * 128256 * (2 + 4 + 4)


def test_a_long_fast_pass_counts_sliced_mlp_activations_and_the_longest_sequence_is_the_edge():
    cfg = config(**{"lora.r": 16, "train.optimizer": "paged_adamw_8bit"})
    long = est.tile_from() + 1
    fast = est.memory_parts(LLAMA3_8B, cfg, long, fast=True)
    assert fast[f"activations (longest pass, {long:,} tokens)"] == int(est.KAPPA_LONG * 2 * 4096 * long)
    plain = est.memory_parts(LLAMA3_8B, cfg, long, fast=False)  # the plain path has no sliced MLP
    assert plain[f"activations (longest pass, {long:,} tokens)"] > int(est.KAPPA * 2 * (4 * 4096 + 3 * 14336) * long)
    gpu = Gpu("card", 24 * GiB, 100.0)
    n = est.longest_sequence(LLAMA3_8B, cfg, gpu, fast=True)
    budget = gpu.memory_bytes * (1 - est.MARGIN)
    assert sum(est.memory_parts(LLAMA3_8B, cfg, n, True).values()) <= budget
    assert sum(est.memory_parts(LLAMA3_8B, cfg, n + 256, True).values()) > budget
    assert est.longest_sequence(LLAMA3_8B, cfg, gpu, fast=False) < n / 10  # whole logits, inputs kept on the GPU


def test_the_longest_sequence_looks_past_the_drop_where_the_mlp_is_sliced():
    """A fast pass over ``tile_from()`` tokens slices its MLP and peaks lower than the last whole-MLP length, so
    under a budget between those two peaks no length at the edge fits but longer ones do."""
    cfg = config(**{"lora.r": 16, "train.optimizer": "paged_adamw_8bit"})
    edge = est.tile_from()

    def peak(tokens: int) -> int:
        return sum(est.memory_parts(LLAMA3_8B, cfg, tokens, True).values())

    assert peak(edge + 1) < peak(edge)  # the drop this test is about
    gpu = fake_gpu((peak(edge + 1), peak(edge)))
    n = est.longest_sequence(LLAMA3_8B, cfg, gpu, fast=True)
    budget = gpu.memory_bytes * (1 - est.MARGIN)
    assert n > edge
    assert peak(n) <= budget < peak(n + 256)


def test_the_planned_passes_are_the_ones_training_feeds():
    lengths = [37, 512, 90, 300, 301, 64, 700, 15, 220, 480, 33, 129]
    rows = [Example(i, list(range(n)), list(range(n))) for i, n in enumerate(lengths)]
    for packed, extra in ((True, {}), (False, {"train.pad_to_multiple_of": 64})):
        cfg = config(
            **{"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 3, "data.cutoff_len": 512}, **extra
        )
        planned = est.run_passes(lengths, cfg, packed=packed)
        order = DataOrder(lengths, cfg, 0, 1, packed=packed)
        objective = SupervisedObjective(None, SimpleNamespace(pad_token_id=0), cfg, packed=packed)
        passes = [p for step in range(2) for p in order.passes(step * 3)]
        fed = [objective.collate([rows[i] for i in p], train=True)["input_ids"].numel() for p in passes]
        assert [p.tokens for p in planned] == fed, packed


def test_packed_and_padded_passes_by_hand():
    lengths = [100, 300, 200, 400]
    cfg = config(**{"train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2, "data.cutoff_len": 512})
    (packed,) = est.run_passes(lengths, cfg, packed=True)  # one step, budget 2 x 512: all four rows in one pass
    assert (packed.tokens, packed.square, sorted(packed.rows)) == (
        1000,
        100**2 + 300**2 + 200**2 + 400**2,
        [0, 1, 2, 3],
    )
    cfg = config(
        **{"train.micro_batch_size": 4, "train.gradient_accumulation_steps": 1, "train.pad_to_multiple_of": 64}
    )
    (padded,) = est.run_passes(lengths, cfg, packed=False)
    assert (padded.tokens, padded.square) == (4 * 448, 4 * 448**2)  # four rows padded to 400 -> 448


def test_a_pass_costs_at_least_its_launches_and_more_with_more_tokens():
    cfg = config()
    gpu = gpu_named("H200")
    short = est.pass_seconds(LLAMA3_8B, cfg, est.Pass(0, [0], 256, 256**2), gpu)
    assert short == pytest.approx(est.LAUNCH * 32)  # launch-bound
    long = est.pass_seconds(LLAMA3_8B, cfg, est.Pass(0, [0], 8192, 8192**2), gpu)
    flops = 6 * (LLAMA3_8B.linear_params() + 13_631_488) * 8192 + 4 * 128256 * 4096 * 8192
    attention = 8 * 4096 * 32 * 8192**2
    assert long == pytest.approx((est.A * flops + est.B * attention) / 989e12 + est.C)
    slower = est.pass_seconds(LLAMA3_8B, cfg, est.Pass(0, [0], 8192, 8192**2), gpu_named("L4"))
    assert slower > 5 * long  # 121 vs 989 TFLOPs


def fake_gpu(peak_between: tuple[int, int]) -> Gpu:
    """A GPU whose budget lies halfway between two predicted peaks."""
    middle = sum(peak_between) / 2
    return Gpu("fake", int(middle / (1 - est.MARGIN)), 989.0)


def test_fit_picks_the_largest_micro_batch_under_a_fake_budget():
    cfg = config(**{"train.micro_batch_size": 8, "train.gradient_accumulation_steps": 1, "data.cutoff_len": 2048})
    lengths = [2048] * 64
    peak = {}
    for micro in (2, 4):
        c = config(
            **{
                "train.micro_batch_size": micro,
                "train.gradient_accumulation_steps": 8 // micro,
                "data.cutoff_len": 2048,
            }
        )
        peak[micro] = est.estimate(LLAMA3_8B, c, lengths, gpu_named("H200"), fast=True).peak_bytes
    gpu = fake_gpu((peak[2], peak[4]))
    assert not est.estimate(LLAMA3_8B, cfg, lengths, gpu, fast=True).fits
    fitted = gate.fit_settings(cfg, LLAMA3_8B, lengths, gpu, fast=True)
    assert (fitted.train.micro_batch_size, fitted.train.gradient_accumulation_steps) == (2, 4)
    assert fitted.data.cutoff_len == 2048


def test_fit_halves_the_cutoff_when_one_row_a_pass_is_too_much():
    cfg = config(**{"train.micro_batch_size": 1, "train.gradient_accumulation_steps": 4, "data.cutoff_len": 4096})
    lengths = [4096] * 16
    at = {c: est.estimate(LLAMA3_8B, config(**{"train.micro_batch_size": 1, "train.gradient_accumulation_steps": 4,
                                              "data.cutoff_len": c}), [min(n, c) for n in lengths], gpu_named("H200"),
                          fast=True).peak_bytes for c in (2048, 4096)}  # fmt: skip
    fitted = gate.fit_settings(cfg, LLAMA3_8B, lengths, fake_gpu((at[2048], at[4096])), fast=True)
    assert fitted.data.cutoff_len == 2048
    with pytest.raises(gate.WouldNotFit, match="no micro-batch size or data.cutoff_len"):
        gate.fit_settings(cfg, LLAMA3_8B, lengths, Gpu("tiny", 2 * GiB, 100.0), fast=True)


def test_unknown_gpu_names_the_known_ones():
    with pytest.raises(UnknownGpu, match="H200.*L4"):
        gpu_named("Voodoo2")


def test_a_grpo_plan_counts_the_generation_batch_and_its_kv_cache():
    """Each prompt of a pass is sampled ``grpo.generations`` times, up to its longest prompt + max_new_tokens: the
    pass trains that many sequences of that length, and sampling them holds their keys and values in every layer."""
    cfg = config(**{"train.objective": "grpo", "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1,
                    "train.max_steps": 1, "grpo.generations": 8, "grpo.max_new_tokens": 256})  # fmt: skip
    plan = est.estimate(LLAMA3_8B, cfg, [100, 300, 50, 70], gpu_named("H100-80GB"), fast=False)
    (only,) = plan.passes
    length = max([100, 300, 50, 70][i] for i in only.rows) + 256
    assert only.tokens == 2 * 8 * length and only.square == 2 * 8 * length**2
    kv = plan.parts[f"KV cache (generating 16 sequences of up to {length:,} tokens)"]
    assert kv == 2 * 32 * 8 * 128 * 16 * length * 2  # keys and values, 32 layers, 8 kv heads of 128, bf16
    assert plan.parts[f"activations (longest pass, {16 * length:,} tokens)"] > 0


def grpo_plan(iterations: int) -> est.Plan:
    """A GRPO run of one epoch over six prompts, two a step (three groups of steps), on the fast path."""
    cfg = config(**{"train.objective": "grpo", "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1,
                    "grpo.generations": 4, "grpo.max_new_tokens": 128, "grpo.iterations": iterations})  # fmt: skip
    return est.estimate(LLAMA3_8B, cfg, [100, 300, 50, 70, 80, 90], gpu_named("H100-80GB"), fast=True)


def test_grpo_iterations_sample_once_a_group_and_train_every_step():
    """With ``grpo.iterations`` 2 an epoch takes twice the steps (``data.order.total_steps``), each trained on the
    same prompts' completions, but only the first step of each pair samples them (``GrpoObjective.start_step``):
    the epoch's sampling time is unchanged and its training time doubles."""
    once, twice = grpo_plan(1), grpo_plan(2)
    assert (once.steps, twice.steps) == (3, 6)
    assert [p.rows for p in twice.passes] == [p.rows for p in once.passes for _ in range(2)]
    one_pass = est.DECODE * 32 * 128  # a decode step a new token, every decoder layer
    assert once.sample_seconds == pytest.approx(3 * one_pass)
    assert twice.sample_seconds == pytest.approx(once.sample_seconds)
    trained_once = once.run_seconds - once.sample_seconds
    assert twice.run_seconds - twice.sample_seconds == pytest.approx(2 * trained_once)
    assert twice.run_seconds < 2 * once.run_seconds


def test_the_longest_sequence_note_says_the_host_memory_its_layer_inputs_need():
    """On the fast path a pass parks every layer's input in pinned host memory (32 x 4,096 x 2 bytes a token at
    8B), which on an 80 GB card's host is the tighter limit: the note names it beside the length."""
    plan = est.estimate(LLAMA3_8B, config(), [100, 300], gpu_named("H100-80GB"), fast=True)
    (note,) = [n for n in plan.notes if n.startswith("the longest single sequence")]
    longest = est.longest_sequence(LLAMA3_8B, config(), gpu_named("H100-80GB"), fast=True)
    assert f"{longest:,} tokens" in note and f"need {est.gib(32 * longest * 4096 * 2)} of host memory" in note
    plain = est.estimate(LLAMA3_8B, config(), [100, 300], gpu_named("H100-80GB"), fast=False)
    assert "host memory" not in next(n for n in plain.notes if n.startswith("the longest single sequence"))


def test_a_pass_whose_layer_inputs_outgrow_the_host_memory_is_refused_with_its_size():
    """The fast path parks 32 x 4,096 x 2 bytes a token at 8B in pinned host memory: 84 GiB for a 344,064-token
    row, which a 125 GiB host holds and a 64 GiB host does not (its out-of-memory killer would end the run)."""
    cfg = config(**{"data.cutoff_len": 344_064, "train.micro_batch_size": 1, "train.gradient_accumulation_steps": 1})
    plan = est.estimate(LLAMA3_8B, cfg, [344_064], gpu_named("H100-80GB"), fast=True)
    assert gate.host_refusal(plan, LLAMA3_8B, cfg, 125 * GiB, processes=1) is None
    why = gate.host_refusal(plan, LLAMA3_8B, cfg, 64 * GiB, processes=1)
    assert "344,064 tokens, parks 84.00 GiB" in why and "64.00 GiB available" in why and "data.cutoff_len=172032" in why
    # two processes on the host park twice; the plain path and an unreadable meminfo park nothing kotune can see
    assert "2 processes" in gate.host_refusal(plan, LLAMA3_8B, cfg, 125 * GiB, processes=2)
    plain = est.estimate(LLAMA3_8B, cfg, [344_064], gpu_named("H100-80GB"), fast=False)
    assert gate.host_refusal(plain, LLAMA3_8B, cfg, 64 * GiB, processes=1) is None
    assert gate.host_refusal(plan, LLAMA3_8B, cfg, None, processes=1) is None
    assert gate.available_host_bytes() is None or gate.available_host_bytes() > 0
