"""Preference objectives on per-sequence log-probabilities: DPO (sigmoid, IPO, label smoothing), ORPO, SimPO, KTO.

Each loss function takes the summed log-probabilities of the chosen and rejected responses (and their token
counts, for the length-normalised objectives) and returns per-pair losses and rewards; ``preference_step`` runs
the model on a batch from ``collate_pairs`` and gathers the metrics. DPO's and KTO's reference is the same model
with its adapter switched off (peft's ``disable_adapter``): no second copy of the weights is held. A run that starts
from an adapter (``model.adapter``, e.g. SFT) takes as reference that starting model: its LoRA weights are kept
aside (``StartWeights``, the adapter's size) and put in place for the reference pass, since switching the adapter
off would give the base instead.

Papers: DPO, Rafailov et al. 2023 (eq. 7); IPO, Azar et al. 2023 (eq. 17); conservative DPO (label smoothing),
Mitchell 2023; ORPO, Hong et al. 2024 (eq. 6-7); SimPO, Meng et al. 2024 (eq. 6); KTO, Ethayarajh et al. 2024
(eq. 8). ``tests/test_pref_objectives.py`` checks each against an implementation written from those formulas.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from kotune.data.examples import IGNORE
from kotune.preference_config import PreferenceConfig

METRICS = (
    "loss",
    "reward_accuracy",
    "reward_margin",
    "rewards_chosen",
    "rewards_rejected",
    "logps_chosen",
    "logps_rejected",
)
"""Per-pair means a step or an evaluation reports (with ``eval_`` in front for evaluations)."""


def is_fast(model) -> bool:
    """Whether ``model`` (or the module DDP wraps) is the fast path's ``FastCausalLM``."""
    from kotune.fast.decoder import FastCausalLM

    return isinstance(getattr(model, "module", None) or model, FastCausalLM)


def fast_module(forward):
    """The fast path's ``FastCausalLM`` that ``forward`` is or wraps (DDP), None for any other module or None."""
    return getattr(forward, "module", forward) if forward is not None and is_fast(forward) else None


def token_logps(model, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token [rows, length - 1] with the logits divided by ``temperature``, in
    float32 (0 where unlabelled). Shared by the preference objectives (summed per sequence) and GRPO (per token).
    The fast path projects the labelled positions only, in chunks."""
    if is_fast(model):
        return model(batch["input_ids"], batch["labels"], temperature=temperature)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    if temperature != 1.0:  # dividing by 1 changes nothing but would copy the vocab-sized logits
        logits = logits / temperature
    labels = batch["labels"][:, 1:]
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * (labels != IGNORE)  # log_softmax without a vocab-sized copy


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's labelled tokens, their count), in float32. The fast path takes
    a packed batch (``collate_pairs(..., packed=True)``) and projects the labelled positions only, in chunks."""
    if is_fast(model):
        ids, labels = batch["input_ids"], batch["labels"]
        return model(ids, labels, batch.get("position_ids"), batch.get("cu_seqlens"), per_sequence=True)
    return token_logps(model, batch).sum(-1), (batch["labels"][:, 1:] != IGNORE).sum(-1)


def dpo_loss(pc, pr, rc, rr, p: PreferenceConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO on summed log-probs of policy (pc, pr) and reference (rc, rr): per-pair loss, chosen / rejected rewards."""
    margin = (pc - rc) - (pr - rr)
    if p.loss_type == "ipo":  # (h - 1 / (2 beta))^2, h the log-ratio margin
        loss = (margin - 1 / (2 * p.beta)) ** 2
    else:  # -log sigmoid(beta h), with a share eps of pairs taken as flipped (conservative DPO)
        eps = p.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(p.beta * margin) - eps * F.logsigmoid(-p.beta * margin)
    return loss, p.beta * (pc - rc).detach(), p.beta * (pr - rr).detach()


def simpo_loss(pc, pr, nc, nr, p: PreferenceConfig):
    """SimPO: rewards are beta x the token-mean log-prob (no reference); loss -log sigmoid(reward gap - gamma)."""
    chosen, rejected = p.beta * pc / nc, p.beta * pr / nr
    return -F.logsigmoid(chosen - rejected - p.simpo_gamma), chosen.detach(), rejected.detach()


def orpo_loss(pc, pr, nc, nr, p: PreferenceConfig):
    """ORPO: the chosen response's token-mean NLL + lambda x -log sigmoid(log odds ratio), odds = P / (1 - P) with
    P the token-mean probability; rewards (reported only) are beta x the token-mean log-prob."""
    mc, mr = pc / nc, pr / nr
    log_odds = (mc - mr) - (torch.log1p(-torch.exp(mc)) - torch.log1p(-torch.exp(mr)))
    loss = -mc - p.orpo_lambda * F.logsigmoid(log_odds)
    return loss, p.beta * mc.detach(), p.beta * mr.detach()


def kto_loss(pc, pr, rc, rr, p: PreferenceConfig):
    """KTO on pairs, the chosen response desirable and the rejected one undesirable; per pair the mean of the two
    responses' lambda_y - v(x, y). The reference point z0 (the paper's KL estimate) is the batch's mean log-ratio
    over all its responses, clamped at 0 and not differentiated: estimated from the batch's own responses, not
    from mismatched prompt / response pairs as in the paper's implementation."""
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    z0 = torch.cat([chosen_ratio, rejected_ratio]).mean().clamp(min=0).detach()
    desirable = p.kto_desirable_weight * (1 - torch.sigmoid(p.beta * (chosen_ratio - z0)))
    undesirable = p.kto_undesirable_weight * (1 - torch.sigmoid(p.beta * (z0 - rejected_ratio)))
    return (desirable + undesirable) / 2, p.beta * chosen_ratio.detach(), p.beta * rejected_ratio.detach()


def kto_unpaired_loss(policy, ref, desirable, p: PreferenceConfig):
    """KTO on unpaired responses (``desirable``: bool per response): each response's lambda_y - v(x, y), z0 as for
    pairs (the batch's mean log-ratio, clamped at 0, not differentiated); per-response losses and rewards."""
    ratio = policy - ref
    z0 = ratio.mean().clamp(min=0).detach()
    towards = p.kto_desirable_weight * (1 - torch.sigmoid(p.beta * (ratio - z0)))
    away = p.kto_undesirable_weight * (1 - torch.sigmoid(p.beta * (z0 - ratio)))
    return torch.where(desirable, towards, away), p.beta * ratio.detach()


def unpaired_metrics(loss, rewards, logps, desirable) -> dict[str, torch.Tensor]:
    """Metric sums of unpaired responses; ``metric_means`` divides the chosen / rejected ones by their counts.
    A response counts as accurate when its reward has its label's sign (desirable above 0, undesirable below)."""
    undesirable = ~desirable
    return {
        "loss": loss.detach().sum(),
        "reward_accuracy": torch.where(desirable, rewards > 0, rewards < 0).float().sum(),
        "reward_margin": rewards.new_zeros(()),  # the difference of the two means, set by metric_means
        "rewards_chosen": rewards[desirable].sum(),
        "rewards_rejected": rewards[undesirable].sum(),
        "logps_chosen": logps.detach()[desirable].sum(),
        "logps_rejected": logps.detach()[undesirable].sum(),
        "desirable": desirable.sum(),
        "undesirable": undesirable.sum(),
    }


def metric_means(sums: dict[str, float], n: int) -> dict[str, float]:
    """``METRICS`` as means of their sums over ``n`` pairs (unpaired: responses, and the chosen / rejected
    values over the responses of that label)."""
    if "desirable" not in sums:
        return {key: sums[key] / max(1, n) for key in METRICS}
    means = {key: sums[key] / max(1, n) for key in ("loss", "reward_accuracy")}
    for key, count in (("chosen", sums["desirable"]), ("rejected", sums["undesirable"])):
        for name in (f"rewards_{key}", f"logps_{key}"):
            means[name] = sums[name] / max(1, count)
    means["reward_margin"] = means["rewards_chosen"] - means["rewards_rejected"]
    return {key: means[key] for key in METRICS}


class StartWeights:
    """A copy of the trainable (LoRA) weights as they start; ``swapped_in`` puts them in place for a reference
    pass and the current ones back after it."""

    def __init__(self, model):
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @contextmanager
    def swapped_in(self, model):
        params = dict(model.named_parameters())
        current = {n: params[n].detach().clone() for n in self.start}
        with torch.no_grad():
            for name, value in self.start.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    params[name].copy_(value)


@contextmanager
def lora_b_zeroed(model):
    """The adapter switched off for the fast path, which reads the LoRA weights, not peft's switch: with B = 0
    every LoRA term is 0, so the output is the base's exactly. B is put back after."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in saved:
            params[name].zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@contextmanager
def reference_of(model, start: StartWeights | None = None, fast=None):
    """A block, without gradients, in which the module it yields computes the reference: the starting weights
    when ``start`` is given, else the same model with its LoRA adapter switched off (the base). ``fast``: the
    fast-path model of ``model`` (it reads the same weights), which then computes it."""
    if start is not None:
        switch = start.swapped_in(model)
    elif fast is not None:
        switch = lora_b_zeroed(model)
    else:
        switch = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    runner = model if fast is None else fast
    training = runner.training
    runner.eval()  # the reference is deterministic: no LoRA dropout in its pass (the start weights have LoRA)
    try:
        with torch.no_grad(), switch:
            yield runner
    finally:
        runner.train(training)


def reference_logps(model, batch, start: StartWeights | None = None, fast=None) -> torch.Tensor:
    """Summed log-probs of each sequence under the reference (``reference_of``)."""
    with reference_of(model, start, fast) as runner:
        return sequence_logps(runner, batch)[0]


def preference_step(
    model,
    batch: dict[str, torch.Tensor],
    objective: str,
    p: PreferenceConfig,
    start: StartWeights | None = None,
    forward=None,
):
    """Summed loss over the batch's pairs (to backpropagate after dividing by the step's pairs) and the per-pair
    metric sums (``METRICS``; see ``metric_means``); ``start``: see ``reference_logps``; ``forward``: the module
    the policy's pass calls (the fast path's model, and DDP's wrapper with several processes). A batch of unpaired
    responses (``desirable`` in it) trains KTO, one loss per response."""
    # the reference pass first: swapping weights in and out after the policy's forward would invalidate what
    # autograd saved for its backward
    ref = reference_logps(model, batch, start, fast_module(forward)) if objective in ("dpo", "kto") else None
    logps, counts = sequence_logps(model if forward is None else forward, batch)
    if "desirable" in batch:
        if objective != "kto":
            raise ValueError(f"unpaired responses train only with kto, not {objective}")
        loss, rewards = kto_unpaired_loss(logps, ref, batch["desirable"], p)
        return loss.sum(), unpaired_metrics(loss, rewards, logps, batch["desirable"])
    n = logps.shape[0] // 2
    pc, pr, nc, nr = logps[:n], logps[n:], counts[:n].clamp(min=1), counts[n:].clamp(min=1)
    if ref is not None:
        loss, chosen, rejected = (dpo_loss if objective == "dpo" else kto_loss)(pc, pr, ref[:n], ref[n:], p)
    elif objective == "simpo":
        loss, chosen, rejected = simpo_loss(pc, pr, nc, nr, p)
    elif objective == "orpo":
        loss, chosen, rejected = orpo_loss(pc, pr, nc, nr, p)
    else:
        raise ValueError(f"not a preference objective: {objective}")
    metrics = {
        "loss": loss.detach().sum(),
        "reward_accuracy": (chosen > rejected).float().sum(),
        "reward_margin": (chosen - rejected).sum(),
        "rewards_chosen": chosen.sum(),
        "rewards_rejected": rejected.sum(),
        "logps_chosen": pc.detach().sum(),
        "logps_rejected": pr.detach().sum(),
    }
    return loss.sum(), metrics
