"""The audit of preference pairs, beside the SFT audit's shape (``AuditReport``) so ``kotune train`` prints both
the same way: identical and empty responses, prompts cut, responses that lost their closing token, the length
ratio chosen / rejected (a length bias the objective would learn), and duplicate rows. Unpaired (KTO) rows: the
same but for the pair checks, and the balance of desirable and undesirable responses instead."""

from __future__ import annotations

import numpy as np

from kotune.data.audit import FATAL, INFO, WARNING, AuditReport, Finding, length_stats, row_list
from kotune.data.preference import PreferenceData, UnpairedResponse, UnpairedText

MAX_LEFT_OUT = 0.5
"""Share of a file's rows left out (missing or empty responses, SFT rows in a pair file) above which the audit
stops the run: so many unusable rows mean the wrong file or unmapped columns, not a few bad rows."""
LENGTH_BIAS = 0.7
"""Share of pairs whose chosen response is the longer one above which the audit warns (or below 1 - it)."""


def _pair_findings(data: PreferenceData, cutoff_len: int, max_prompt_len: int) -> list[Finding]:
    found: list[Finding] = []
    same = [t.row for t in data.texts if not isinstance(t, UnpairedText) and t.chosen.strip() == t.rejected.strip()]
    if same:
        found.append(
            Finding(
                "identical_pair",
                WARNING,
                f"{len(same)} pairs have identical chosen and rejected "
                f"responses (nothing to prefer; rows {row_list(same)})",
                same,
            )
        )
    empty = sorted(r for r, why in data.skipped.items() if why == "empty response")
    if empty:
        found.append(
            Finding(
                "empty_response",
                WARNING,
                f"{len(empty)} rows have an empty chosen or rejected "
                f"response and are left out (rows {row_list(empty)})",
                empty,
            )
        )
    for reason in sorted({why for why in data.skipped.values() if why != "empty response"}):
        rows = sorted(r for r, why in data.skipped.items() if why == reason)
        found.append(Finding("skipped", WARNING, f"{len(rows)} rows left out: {reason} ({row_list(rows)})", rows))
    if data.blank_prompts:
        rows = data.blank_prompts
        found.append(
            Finding(
                "blank_prompt", WARNING, f"{len(rows)} rows train on an empty or blank prompt ({row_list(rows)})", rows
            )
        )
    if data.prompt_cut:
        found.append(
            Finding(
                "prompt_cut",
                WARNING,
                f"{len(data.prompt_cut)} prompts are longer than "
                f"preference.max_prompt_len={max_prompt_len} and lose their start "
                f"(rows {row_list(data.prompt_cut)})",
                data.prompt_cut,
            )
        )
    if data.eos_lost:
        found.append(
            Finding(
                "eos_lost",
                WARNING,
                f"{len(data.eos_lost)} pairs have a response cut at "
                f"data.cutoff_len={cutoff_len} before its closing token (rows "
                f"{row_list(data.eos_lost)})",
                data.eos_lost,
            )
        )
    seen: dict[tuple, int] = {}
    dupes = [t.row for t in data.texts if seen.setdefault(_content(t), t.row) != t.row]
    what = "completion and label" if data.texts and isinstance(data.texts[0], UnpairedText) else "chosen and rejected"
    if dupes:
        found.append(
            Finding(
                "duplicates",
                WARNING,
                f"{len(dupes)} rows repeat an earlier row's prompt, {what} (rows {row_list(dupes)})",
                dupes,
            )
        )
    return found


def _content(text) -> tuple:
    if isinstance(text, UnpairedText):
        return text.prompt, text.completion, text.desirable
    return text.prompt, text.chosen, text.rejected


def label_balance(responses: list[UnpairedResponse]) -> Finding:
    """Desirable / undesirable counts of unpaired data: KTO's weights should offset an imbalance (the paper keeps
    lambda_D n_D / (lambda_U n_U) between 1 and 4/3); one label alone gives nothing to contrast."""
    desirable = sum(r.desirable for r in responses)
    undesirable = len(responses) - desirable
    message = f"{desirable} desirable and {undesirable} undesirable responses"
    if desirable and undesirable:
        return Finding("label_balance", INFO, message + "; set preference.kto_desirable_weight / "
                       "kto_undesirable_weight so that weight x count is about even")  # fmt: skip
    return Finding("label_balance", WARNING, message + ": only one label, nothing to contrast")


def length_bias(data: PreferenceData) -> Finding | None:
    """Mean token-length ratio chosen / rejected, and the share of pairs whose chosen response is longer."""
    if not data.pairs or isinstance(data.pairs[0], UnpairedResponse):
        return None
    chosen = np.array([len(p.chosen) for p in data.pairs], float)
    rejected = np.array([len(p.rejected) for p in data.pairs], float)
    ratio = float(np.mean(chosen / np.maximum(rejected, 1)))
    longer = float(np.mean(chosen > rejected))
    level = WARNING if longer > LENGTH_BIAS or longer < 1 - LENGTH_BIAS else INFO
    return Finding(
        "length_ratio",
        level,
        f"chosen / rejected length ratio {ratio:.2f} (mean); the chosen "
        f"response is the longer one in {100 * longer:.0f}% of pairs"
        + ("; the objective may learn length rather than quality" if level == WARNING else ""),
    )


def audit_pairs(source: str, data: PreferenceData, n_rows: int, cutoff_len: int, max_prompt_len: int) -> AuditReport:
    """The audit report of one preference source; no trainable pair at all is fatal."""
    lengths = np.array([p.longest for p in data.pairs] or [0])
    stats, histogram = length_stats(np.sort(lengths))
    tokens = sum(p.input_tokens for p in data.pairs)
    trained = sum(p.trained_tokens for p in data.pairs)
    findings = _pair_findings(data, cutoff_len, max_prompt_len)
    unpaired = bool(data.pairs) and isinstance(data.pairs[0], UnpairedResponse)
    extra = label_balance(data.pairs) if unpaired else length_bias(data)
    if extra is not None:
        findings.append(extra)
    if not data.pairs:
        findings.append(Finding("no_pairs", FATAL, "no row holds a trainable preference pair"))
    elif len(data.skipped) > MAX_LEFT_OUT * n_rows:
        rows = sorted(data.skipped)
        findings.append(
            Finding(
                "most_rows_left_out",
                FATAL,
                f"{len(rows)} of {n_rows} rows are left out ({row_list(rows)}; the reasons are above): is this "
                "the file you meant, or do its columns need data.columns?",
                rows,
            )
        )
    return AuditReport(
        source, "preference", n_rows, len(data.pairs), cutoff_len, stats, histogram, tokens, trained, [], findings
    )
