"""The ``preference`` section of the config: settings of the preference objectives (``train.objective``).

Kept apart from ``config.py`` (which composes it as a section) so the preference settings read in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kotune.errors import KotuneError


@dataclass
class PreferenceConfig:
    beta: float = 0.1
    """Strength of the preference: DPO / IPO / KTO's beta (papers: 0.1); for SimPO the reward scale (paper: 2.0)."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO's loss: ``sigmoid`` (the DPO paper) or ``ipo`` (squared distance of the log-ratio margin to 1/(2 beta))."""
    label_smoothing: float = 0.0
    """DPO sigmoid: the share of pairs assumed mislabelled (conservative DPO); 0 is plain DPO."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (paper: 0.5 to 1.6, with beta 2.0 to 2.5)."""
    orpo_lambda: float = 0.1
    """ORPO's weight of the odds-ratio term added to the chosen response's token-mean NLL (paper: 0.1)."""
    kto_desirable_weight: float = 1.0
    """KTO's weight of desirable responses (chosen, or label true), lambda_D."""
    kto_undesirable_weight: float = 1.0
    """KTO's weight of undesirable responses (rejected, or label false), lambda_U; with unpaired data, weights
    that make lambda_D n_D about lambda_U n_U offset uneven label counts (the paper keeps the ratio in [1, 4/3])."""
    max_prompt_len: int = 512
    """Prompt tokens kept (its end: the part next to the response); must be below ``data.cutoff_len``, so each
    response keeps at least one token. Prompt + response is then cut to ``data.cutoff_len`` at the response's end."""


class PreferenceConfigError(KotuneError, ValueError):
    """A preference setting out of range; the message names the key."""

    refusal = True


def validate_preference(p: PreferenceConfig, cutoff_len: int, objective: str) -> None:
    """Ranges of the preference settings; errors name the key. The prompt length is checked for preference runs
    only (an SFT config with a short cutoff is fine)."""
    if p.beta <= 0:
        raise PreferenceConfigError(f"'preference.beta' must be positive, got {p.beta}")
    if not 0 <= p.label_smoothing < 0.5:
        raise PreferenceConfigError(f"'preference.label_smoothing' must be in [0, 0.5), got {p.label_smoothing}")
    for key in ("orpo_lambda", "kto_desirable_weight", "kto_undesirable_weight", "simpo_gamma"):
        if getattr(p, key) < 0:
            raise PreferenceConfigError(f"'preference.{key}' must not be negative, got {getattr(p, key)}")
    if objective in ("dpo", "orpo", "simpo", "kto") and not 0 < p.max_prompt_len < cutoff_len:
        raise PreferenceConfigError(
            f"'preference.max_prompt_len' must be positive and below data.cutoff_len ({cutoff_len}), "
            f"got {p.max_prompt_len}"
        )
