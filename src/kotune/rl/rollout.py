"""Rollouts: a step's completions sampled from the training model itself (its LoRA adapter on, not merged: no second
copy of the weights), batched with a KV cache, each completion drawn with its own seeded generator.

The seed of a completion is a function of (``train.seed``, step, prompt row, its index in the group), so a resumed
run, or a run on another number of processes (each samples its share of the step's prompts), draws the same tokens
from the same distributions: the sampler's state is the step a checkpoint holds. Prefill and decode step are
inference's (``kotune.inference.generate``); sampling here also keeps each token's log-probability, which the
training forward recomputes (their difference is reported per step). On the fast path the steps are
``kotune.fast.generation``'s: the training path's layers, a static KV cache, decode steps replayed as a CUDA graph.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kotune.inference.generate import ModelSteps, left_pad


@dataclass
class Completion:
    ids: list[int]
    """Sampled ids, the stop token included when one ended it."""
    logps: list[float]
    """Each sampled token's log-probability under the sampling distribution (logits / temperature, before top-p)."""
    stopped: bool
    """A stop token or stop string ended it; False when ``max_new_tokens`` ran out."""


def completion_seed(seed: int, step: int, row: int, k: int) -> int:
    """The seed of completion ``k`` of prompt ``row`` at ``step``: a hash, so nearby keys give unrelated streams."""
    digest = hashlib.sha256(f"{seed}/{step}/{row}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_rows(logits: torch.Tensor, top_p: float, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from ``softmax(logits)`` cut to its top-p nucleus, row ``i``'s randomness drawn with
    ``generators[i]`` on the logits' device: the argmax of log-probabilities plus Gumbel noise is a draw from the
    distribution (Gumbel-max), so nothing vocabulary-sized goes to the host and nothing is sorted without top-p."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        # drop tokens once the mass before them reaches top_p; the most likely token always stays
        sorted_logp = sorted_logp.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        logp = torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_logp)
    noise = torch.stack([torch.rand(logp.shape[-1], generator=g, device=logp.device) for g in generators])
    return (logp - (-noise.log()).log()).argmax(-1)


@dataclass(frozen=True)
class Sampler:
    """How completions are sampled: stop ids, stop strings (checked on the decoded text), the limits."""

    pad_id: int
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    max_new_tokens: int
    temperature: float
    """0: greedy."""
    top_p: float


def ended_by_string(tokenizer, ids: list[int], stops: tuple[str, ...]) -> bool:
    if not stops:
        return False
    text = tokenizer.decode(ids[-16:], skip_special_tokens=False)  # a stop string ends within the last tokens
    return any(s in text for s in stops)


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[list[int]], seeds: list[int], s: Sampler, steps=None) -> list[Completion]:
    """Sample a completion of each prompt (``seeds[i]`` seeds prompt i's generator) in one batch; ``model`` is put
    in eval mode for it (no LoRA dropout) and back after. ``steps``: what runs the prefill and decode steps
    (``kotune.fast.generation.FastGenerator`` on the fast path), by default transformers' forward."""
    training = model.training
    model.eval()
    try:
        # the output layer's device: the fast path may keep the embedding table in host memory
        device = model.get_output_embeddings().weight.device
        return _decode(steps or ModelSteps(model), tokenizer, prompts, seeds, s, device)
    finally:
        model.train(training)


def _decode(steps, tokenizer, prompts, seeds, s: Sampler, device) -> list[Completion]:
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    ids, mask = left_pad(prompts, s.pad_id, device)
    logits = steps.start(ids, mask, s.max_new_tokens)
    out = [Completion([], [], False) for _ in prompts]
    going = [True] * len(prompts)
    stops = set(s.stop_ids)
    try:
        for step in range(s.max_new_tokens):
            if s.temperature > 0:
                logits = logits / s.temperature
                token = sample_rows(logits, s.top_p, generators)
            else:  # greedy (evaluations)
                token = logits.argmax(-1)
            logps = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1).tolist()
            for i, (t, lp) in enumerate(zip(token.tolist(), logps, strict=True)):
                if not going[i]:
                    continue
                out[i].ids.append(t)
                out[i].logps.append(lp)
                if t in stops or ended_by_string(tokenizer, out[i].ids, s.stop_strings):
                    going[i], out[i].stopped = False, True
            if not any(going) or step + 1 == s.max_new_tokens:
                break
            # rows that ended keep decoding pad tokens (masked out) so the batch and its cache keep their shape
            live = torch.tensor(going, device=device)
            logits = steps.step(torch.where(live, token, torch.full_like(token, s.pad_id)), live)
    finally:
        steps.release()
    return out
