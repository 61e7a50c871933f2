"""A group's samples: each prompt's completions as the first step of a group of ``grpo.iterations`` steps sampled
and scored them, kept for the group's later steps, which train on them again.

Kept per prompt row, not per batch: a step's batches are rebuilt from them (the same rows give the same batches),
and a checkpoint taken inside a group holds them (``to_tensors`` / ``from_tensors``, gathered from every process),
so a resumed run, on any number of processes, trains its later steps on what the uninterrupted run sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kotune.rl.rollout import Completion


@dataclass
class Sample:
    """One prompt's completions, as sampled and scored at its group's first step."""

    prompt_length: int
    completions: list[Completion]
    totals: list[float]
    """Each completion's weighted reward."""
    parts: list[list[float]]
    """Each completion's reward components, in ``RewardSet.names`` order."""
    old_logps: list[torch.Tensor | None]
    """Each completion's tokens' log-probabilities in the training forward of the step that sampled it (the "old"
    policy the later steps' probability ratio is taken against); set by that forward."""

    def keep_old(self, logps: torch.Tensor, rows: range) -> None:
        """Take the old log-probabilities from a training forward's [batch rows, length - 1] ``logps``, whose
        ``rows`` hold this prompt's completions in order (position ``j`` predicts token ``j + 1``)."""
        start = self.prompt_length - 1
        for k, (row, c) in enumerate(zip(rows, self.completions, strict=True)):
            self.old_logps[k] = logps[row, start : start + len(c.ids)]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """On the host, padded to the longest completion (``lengths`` says where each ends). Floats that came
        from Python lists are float64, the old log-probabilities float32 as computed: all come back exactly."""
        width = max(len(c.ids) for c in self.completions)
        n = len(self.completions)
        ids, sampled = torch.zeros((n, width), dtype=torch.long), torch.zeros((n, width), dtype=torch.float64)
        old = torch.zeros((n, width), dtype=torch.float32)
        for k, c in enumerate(self.completions):
            ids[k, : len(c.ids)] = torch.tensor(c.ids, dtype=torch.long)
            sampled[k, : len(c.ids)] = torch.tensor(c.logps, dtype=torch.float64)
            old[k, : len(c.ids)] = self.old_logps[k].detach().to("cpu", torch.float32)
        return {
            "prompt_length": torch.tensor([self.prompt_length]),
            "lengths": torch.tensor([len(c.ids) for c in self.completions]),
            "ids": ids,
            "sampled_logps": sampled,
            "old_logps": old,
            "stopped": torch.tensor([c.stopped for c in self.completions]),
            "totals": torch.tensor(self.totals, dtype=torch.float64),
            "parts": torch.tensor(self.parts, dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Sample:
        lengths = t["lengths"].tolist()
        completions = [
            Completion(t["ids"][k, :n].tolist(), t["sampled_logps"][k, :n].tolist(), bool(t["stopped"][k]))
            for k, n in enumerate(lengths)
        ]
        old: list[torch.Tensor | None] = [t["old_logps"][k, :n] for k, n in enumerate(lengths)]
        return cls(int(t["prompt_length"]), completions, t["totals"].tolist(), t["parts"].tolist(), old)


def flatten(samples: dict[int, Sample]) -> dict[str, torch.Tensor]:
    """``samples`` by prompt row as one flat dict of tensors (keys ``ROW/NAME``), for a safetensors file."""
    return {f"{row}/{name}": value for row, s in samples.items() for name, value in s.to_tensors().items()}


def unflatten(tensors: dict[str, torch.Tensor]) -> dict[int, Sample]:
    """Inverse of ``flatten``."""
    by_row: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        row, name = key.split("/", 1)
        by_row.setdefault(int(row), {})[name] = value
    return {row: Sample.from_tensors(t) for row, t in by_row.items()}
