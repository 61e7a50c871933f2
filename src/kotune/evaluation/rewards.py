"""``kotune eval`` on a GRPO run: its held-out prompts (or ``--data``) answered greedily and scored with the run's own
rewards (``grpo.rewards``, read from the run's config), so before (``--base``) and after are the same measurement
training's ``eval_reward`` is."""

from __future__ import annotations

from kotune.data.prompts import read_prompts
from kotune.data.read import DataError
from kotune.inference.generate import completion_text
from kotune.rl.rewards import RewardSet
from kotune.rl.rollout import Sampler, rollout

BATCH = 8
"""Prompts generated together."""


def reward_part(folder, model, tokenizer, stops: list[int], path: str | None, limit: int | None, max_new: int) -> dict:
    """Mean reward and each component's over the prompts, and every reply with its reward."""
    cfg = folder.config
    source = path or cfg.data.validation_path
    if source is None:
        raise DataError(f"{folder.path}: the GRPO run has no data.validation_path; give held-out prompts with --data")
    prompts, _, _ = read_prompts(source, "validation", cfg, tokenizer)
    prompts = prompts[:limit] if limit else prompts
    rewards = RewardSet.from_config(cfg.grpo)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = Sampler(pad, tuple(stops), tuple(cfg.grpo.stop), max_new, 0.0, 1.0)
    texts = []
    for start in range(0, len(prompts), BATCH):
        part = prompts[start : start + BATCH]
        done = rollout(model, tokenizer, [p.ids for p in part], [0] * len(part), greedy)
        texts += [completion_text(tokenizer, c.ids) for c in done]
    totals, components = rewards.score(texts, [p.fields for p in prompts])
    n = max(1, len(prompts))
    replies = [{"row": p.row, "reply": t, "reward": r} for p, t, r in zip(prompts, texts, totals, strict=True)]
    return {
        "data": source,
        "prompts": len(prompts),
        "reward": sum(totals) / n,
        "components": {name: sum(values) / n for name, values in components.items()},
        "replies": replies,
    }
