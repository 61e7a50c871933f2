"""Preference objectives against implementations written from the papers' formulas, on a tiny Llama.

The reference implementation here shares nothing with ``kotune.training.objectives`` but the model: each
sequence runs alone (no padding, no batch), its log-probability is summed token by token in float64 from
``log_softmax``, the reference model is a second, separately loaded copy of the base (not the adapter switched
off), and the losses are computed with ``math`` on Python floats.
"""

from __future__ import annotations

import math

import pytest
import torch

from kotune.data.preference import PreferenceText, UnpairedResponse, collate_pairs, encode_pairs
from kotune.preference_config import PreferenceConfig
from kotune.training.objectives import (
    StartWeights,
    metric_means,
    preference_step,
    reference_logps,
    sequence_logps,
)

PAIRS = [
    ("질문: 서울은 어느 나라의 수도인가요?\n답변:", " 대한민국의 수도입니다.", " 일본입니다."),
    ("Translate to Korean: good morning\n###답변:", "\n좋은 아침입니다.", '"굿모닝"'),
    ("2 + 3 = ?", " 5", " 6이라고 생각합니다만 확실하지 않습니다."),
]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return math.exp(_log_sigmoid(x))


@pytest.fixture(scope="module")
def setup(tiny_llama3_model, llama3_tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_llama3_model, torch_dtype=torch.float32).eval()

    policy = get_peft_model(
        base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    texts = [PreferenceText(i, *pair, True) for i, pair in enumerate(PAIRS)]
    pairs = encode_pairs(texts, llama3_tokenizer, cutoff_len=256, max_prompt_len=128).pairs
    return policy, base(), pairs, collate_pairs(pairs, llama3_tokenizer.eos_token_id)


def _randomize_lora(policy, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@torch.no_grad()
def _seq_logp(model, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logp[len(prompt) + k - 1, token].item() for k, token in enumerate(response))


def _independent(objective: str, p: PreferenceConfig, policy, reference, pairs) -> float:
    """The mean loss over pairs, from the papers' formulas."""
    rows = []
    for pair in pairs:
        lw, ll = _seq_logp(policy, pair.prompt, pair.chosen), _seq_logp(policy, pair.prompt, pair.rejected)
        rw, rl = _seq_logp(reference, pair.prompt, pair.chosen), _seq_logp(reference, pair.prompt, pair.rejected)
        rows.append((lw, ll, rw, rl, len(pair.chosen), len(pair.rejected)))
    if objective == "kto":
        ratios = [lw - rw for lw, _, rw, *_ in rows] + [ll - rl for _, ll, _, rl, *_ in rows]
        z0 = max(0.0, sum(ratios) / len(ratios))
    losses = []
    for lw, ll, rw, rl, nw, nl in rows:
        h = (lw - rw) - (ll - rl)
        if objective == "dpo" and p.loss_type == "sigmoid":  # Rafailov et al. eq. 7; cDPO smoothing
            eps = p.label_smoothing
            losses.append(-(1 - eps) * _log_sigmoid(p.beta * h) - eps * _log_sigmoid(-p.beta * h))
        elif objective == "dpo":  # IPO, Azar et al. eq. 17: (h - 1/(2 tau))^2
            losses.append((h - 1 / (2 * p.beta)) ** 2)
        elif objective == "simpo":  # Meng et al. eq. 6
            losses.append(-_log_sigmoid(p.beta / nw * lw - p.beta / nl * ll - p.simpo_gamma))
        elif objective == "orpo":  # Hong et al. eq. 6-7: odds(y|x) = P / (1 - P), P = exp(mean log-prob)
            pw, pl = math.exp(lw / nw), math.exp(ll / nl)
            ratio = math.log((pw / (1 - pw)) / (pl / (1 - pl)))
            losses.append(-lw / nw - p.orpo_lambda * _log_sigmoid(ratio))
        else:  # KTO, Ethayarajh et al. eq. 8: lambda_y - v(x, y), chosen desirable, rejected undesirable
            vd = p.kto_desirable_weight * _sigmoid(p.beta * ((lw - rw) - z0))
            vu = p.kto_undesirable_weight * _sigmoid(p.beta * (z0 - (ll - rl)))
            losses.append(((p.kto_desirable_weight - vd) + (p.kto_undesirable_weight - vu)) / 2)
    return sum(losses) / len(losses)


CASES = [
    ("dpo", PreferenceConfig(beta=0.1)),
    ("dpo", PreferenceConfig(beta=0.5, label_smoothing=0.2)),
    ("dpo", PreferenceConfig(beta=0.1, loss_type="ipo")),
    ("simpo", PreferenceConfig(beta=2.0, simpo_gamma=0.8)),
    ("orpo", PreferenceConfig(orpo_lambda=0.3)),
    ("kto", PreferenceConfig(beta=0.3, kto_desirable_weight=1.0, kto_undesirable_weight=1.5)),
]


@pytest.mark.parametrize(("objective", "settings"), CASES, ids=[f"{o}-{i}" for i, (o, _) in enumerate(CASES)])
def test_loss_matches_papers_formulas(setup, objective, settings):
    policy, reference, pairs, batch = setup
    _randomize_lora(policy, seed=1)
    with torch.no_grad():
        loss, metrics = preference_step(policy, batch, objective, settings)
    expected = _independent(objective, settings, policy, reference, pairs)
    assert abs(expected) > 1e-3  # a loss of zero would match anything trivially
    assert loss.item() / len(pairs) == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(loss.item(), abs=1e-6)


def test_unpaired_kto_matches_the_papers_formula(setup):
    """Unpaired responses (one label each, uneven counts): the mean of lambda_y - v(x, y), with
    v = lambda_D sigmoid(beta (r - z0)) for desirable and lambda_U sigmoid(beta (z0 - r)) for undesirable responses,
    r the policy / reference log-ratio and z0 the batch's mean r clamped at 0 (as for pairs)."""
    policy, reference, pairs, _ = setup
    _randomize_lora(policy, seed=2)
    labelled = [(p.prompt, response, good) for p in pairs for response, good in ((p.chosen, True), (p.rejected, False))]
    responses = [UnpairedResponse(i, *row) for i, row in enumerate(labelled[:5])]
    settings = PreferenceConfig(beta=0.3, kto_desirable_weight=1.2, kto_undesirable_weight=0.8)
    with torch.no_grad():
        loss, metrics = preference_step(policy, collate_pairs(responses, 0), "kto", settings)
    ratios = [
        _seq_logp(policy, r.prompt, r.completion) - _seq_logp(reference, r.prompt, r.completion) for r in responses
    ]
    z0 = max(0.0, sum(ratios) / len(ratios))
    losses = []
    for r, ratio in zip(responses, ratios, strict=True):
        if r.desirable:
            w = settings.kto_desirable_weight
            losses.append(w - w * _sigmoid(settings.beta * (ratio - z0)))
        else:
            w = settings.kto_undesirable_weight
            losses.append(w - w * _sigmoid(settings.beta * (z0 - ratio)))
    assert loss.item() / len(responses) == pytest.approx(sum(losses) / len(losses), abs=1e-5, rel=1e-5)
    means = metric_means({k: v.item() for k, v in metrics.items()}, len(responses))
    chosen = [settings.beta * x for r, x in zip(responses, ratios, strict=True) if r.desirable]
    rejected = [settings.beta * x for r, x in zip(responses, ratios, strict=True) if not r.desirable]
    assert means["rewards_chosen"] == pytest.approx(sum(chosen) / len(chosen), abs=1e-5)
    assert means["rewards_rejected"] == pytest.approx(sum(rejected) / len(rejected), abs=1e-5)
    assert means["reward_margin"] == pytest.approx(means["rewards_chosen"] - means["rewards_rejected"])
    right = sum(x > 0 for x in chosen) + sum(x < 0 for x in rejected)
    assert means["reward_accuracy"] == pytest.approx(right / len(responses))


def test_first_step_dpo_is_ln2_with_zero_rewards(setup):
    """A fresh LoRA (B = 0) leaves the policy equal to the reference: -log sigmoid(0) = ln 2, rewards 0."""
    policy, _, pairs, batch = setup
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.zero_()
        loss, metrics = preference_step(policy, batch, "dpo", PreferenceConfig(beta=0.1))
    assert loss.item() / len(pairs) == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards_chosen"].item() == pytest.approx(0, abs=1e-6)
    assert metrics["rewards_rejected"].item() == pytest.approx(0, abs=1e-6)
    assert metrics["logps_chosen"].item() < 0


def test_start_weights_are_the_reference_and_gradient_flows(setup):
    """From a start adapter the reference is that starting model: after the LoRA weights move, the reference pass
    still gives the start's log-probs (computed here on the start directly), the current weights come back after
    it, and the loss reaches the LoRA weights."""
    policy, _, pairs, batch = setup
    _randomize_lora(policy, seed=2)
    start_logps = sequence_logps(policy, batch)[0].detach()
    start = StartWeights(policy)
    _randomize_lora(policy, seed=3)
    moved_logps = sequence_logps(policy, batch)[0].detach()
    assert not torch.allclose(start_logps, moved_logps)
    assert torch.allclose(reference_logps(policy, batch, start), start_logps, atol=1e-5)
    assert torch.allclose(sequence_logps(policy, batch)[0].detach(), moved_logps, atol=1e-6)
    policy.zero_grad()
    loss, metrics = preference_step(policy, batch, "dpo", PreferenceConfig(beta=0.1), start)
    loss.backward()
    n = len(pairs)
    expected_chosen = 0.1 * (moved_logps[:n] - start_logps[:n]).sum()
    assert metrics["rewards_chosen"].item() == pytest.approx(expected_chosen.item(), abs=1e-4)
    grads = [p.grad.abs().sum().item() for name, p in policy.named_parameters() if "lora_A" in name]
    assert grads and all(g > 0 for g in grads)


def test_reference_pass_runs_without_dropout(tiny_llama3_model, setup):
    """In training mode with LoRA dropout, the reference pass (start weights swapped in) is deterministic and
    equals the eval-mode log-probs; the model is left in training mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    *_, batch = setup
    base = AutoModelForCausalLM.from_pretrained(tiny_llama3_model, torch_dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"]))
    _randomize_lora(model, seed=4)
    start = StartWeights(model)
    model.eval()
    expected = sequence_logps(model, batch)[0].detach()
    model.train()
    assert torch.allclose(reference_logps(model, batch, start), expected, atol=1e-5)
    assert torch.allclose(reference_logps(model, batch, start), expected, atol=1e-5)
    assert model.training


def _assert_same_up_to_fp32_sums(got, want):
    """Equal up to the rounding of fp32 sums of ~300 log-probs added in another order (an ulp near 256 is 3e-5)."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1] == pytest.approx(want[1], rel=1e-5, abs=1e-4)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def _loss_metrics_grads(policy, batch, objective, settings, **kw):
    params = [p for p in policy.parameters() if p.requires_grad]
    loss, metrics = preference_step(policy, batch, objective, settings, **kw)
    return loss.detach(), {k: v.item() for k, v in metrics.items()}, torch.autograd.grad(loss, params)


@pytest.mark.parametrize(("objective", "settings"), CASES, ids=[f"{o}-{i}" for i, (o, _) in enumerate(CASES)])
@pytest.mark.parametrize("from_start", [False, True])
def test_fast_path_packed_pass_matches_the_plain_path(setup, objective, settings, from_start):
    """Chosen and rejected packed into one row, log-probabilities by the chunked kernel (no full logits), the
    reference with LoRA B zeroed (or the start weights swapped in): the plain path's loss, metrics and LoRA
    gradients; the weights are the same after."""
    from kotune.fast.decoder import FastCausalLM

    policy, _, pairs, batch = setup
    _randomize_lora(policy, seed=3)
    start = StartWeights(policy) if from_start else None
    if from_start:
        _randomize_lora(policy, seed=4)  # the policy has moved away from its start
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    fast = FastCausalLM(policy, torch.float32, checkpoint=True, offload=False, fused=False).train()
    plain = _loss_metrics_grads(policy, batch, objective, settings, start=start)
    packed = collate_pairs(pairs, 0, packed=True)
    assert packed["input_ids"].shape[0] == 1  # one row: every chosen and rejected sequence end to end
    got = _loss_metrics_grads(policy, packed, objective, settings, start=start, forward=fast)
    _assert_same_up_to_fp32_sums(got, plain)
    for name, p in policy.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[name]), name


def test_fast_path_unpaired_kto_matches_the_plain_path(setup):
    from kotune.fast.decoder import FastCausalLM

    policy, _, pairs, _ = setup
    _randomize_lora(policy, seed=5)
    responses = [
        UnpairedResponse(i, p.prompt, p.chosen if i % 2 else p.rejected, bool(i % 2)) for i, p in enumerate(pairs)
    ]
    settings = PreferenceConfig(beta=0.3, kto_undesirable_weight=1.4)
    fast = FastCausalLM(policy, torch.float32, checkpoint=False, offload=False, fused=False).train()
    plain = _loss_metrics_grads(policy, collate_pairs(responses, 0), "kto", settings)
    got = _loss_metrics_grads(policy, collate_pairs(responses, 0, packed=True), "kto", settings, forward=fast)
    _assert_same_up_to_fp32_sums(got, plain)
