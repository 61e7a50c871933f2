"""``eval_report.json`` and its Markdown table; two reports side by side with the change from the first."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kotune.security import portable

REPORT_FILE = "eval_report.json"
TABLE_FILE = "eval_report.md"

GENERATION_ROWS = (
    ("stop_rate", "ends with EOS / end-of-turn", "%"),
    ("loop_rate", "replies that loop (repeated n-grams)", "%"),
    ("repeated_ngrams", "repeated character 10-grams", "%"),
    ("reply_tokens", "reply length (tokens)", ""),
    ("korean_rate", "Korean replies to Korean prompts", "%"),
    ("exact_match", "exact match", "%"),
    ("contains", "contains the reference", "%"),
    ("chrf", "chrF", ""),
)


def metric_rows(report: dict) -> list[tuple[str, str, float | None, str]]:
    """(key, label, value, unit) for everything a report measured, in a fixed order."""
    rows: list[tuple[str, str, float | None, str]] = []
    if "loss" in report:
        rows += [("loss", "loss (held-out rows)", report["loss"]["loss"], "")]
        rows += [("perplexity", "perplexity", report["loss"]["perplexity"], "")]
    for key, label, unit in GENERATION_ROWS:
        if key in report.get("generation", {}):
            rows.append((key, label, report["generation"][key], unit))
    if "rewards" in report:  # a GRPO run: its held-out prompts scored with its rewards
        rewards = report["rewards"]
        rows.append(
            ("rewards.reward", f"reward ({rewards['prompts']} held-out prompts, greedy)", rewards["reward"], "")
        )
        rows += [(f"rewards.{name}", f"  {name}", value, "") for name, value in rewards["components"].items()]
    if "choice" in report:
        choice = report["choice"]
        rows += [("choice.acc", "multiple choice acc", choice["acc"], "%")]
        rows += [("choice.acc_norm", "multiple choice acc_norm", choice["acc_norm"], "%")]
        for subject, values in choice["by_subject"].items():
            rows.append((f"choice.{subject}", f"  {subject} acc ({values['items']} items)", values["acc"], "%"))
    for task, metrics in report.get("harness", {}).items():
        for name, value in metrics.items():
            rows.append((f"harness.{task}.{name}", f"lm-eval {task} {name}", value, ""))
    return rows


def fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if unit == "%" else f"{value:.4g}"


def delta(before: float | None, after: float | None, unit: str) -> str:
    if before is None or after is None:
        return "-"
    change = after - before
    return f"{100 * change:+.1f} pt" if unit == "%" else f"{change:+.4g}"


def not_comparable(report: dict, other: dict) -> dict[str, str]:
    """Why parts of two reports measure different things: ``{"heldout": why, "choice": why}`` for the parts whose
    changes would mislead (other held-out rows, other tokens for them, other multiple-choice items)."""
    why = {}
    if report.get("examples_sha256") != other.get("examples_sha256"):
        rows = (len(other.get("rows", [])), len(report.get("rows", [])))
        detail = (
            [f"data {other.get('data')} vs {report.get('data')}"] if other.get("data") != report.get("data") else []
        )
        detail += [f"{rows[0]} vs {rows[1]} rows"] if rows[0] != rows[1] else []
        why["heldout"] = (
            "other held-out rows or tokens (" + (", ".join(detail) or "another tokenizer or template") + ")"
        )
    mine, theirs = report.get("rewards", {}), other.get("rewards", {})
    if (mine.get("data"), mine.get("prompts")) != (theirs.get("data"), theirs.get("prompts")):
        counts = [f"{r.get('prompts')} of {r.get('data')}" for r in (theirs, mine)]
        why["heldout"] = f"other prompts ({counts[0]} vs {counts[1]})"
    mine, theirs = report.get("choice", {}), other.get("choice", {})
    if (mine.get("file"), mine.get("items")) != (theirs.get("file"), theirs.get("items")):
        counts = f"{theirs.get('items')} items of {theirs.get('file')} vs {mine.get('items')} of {mine.get('file')}"
        why["choice"] = f"other multiple-choice items ({counts})"
    return why


OVERLAP_MARK = " ⚠ overlaps training"
"""Appended to the label of a score whose rows the run's training data holds (``kotune.evaluation.overlap``)."""
PART_UNITS = {"heldout": "held-out rows", "choice": "multiple-choice items"}


def part_of(key: str) -> str | None:
    """The evaluated part a metric is measured on: ``heldout``, ``choice``, or None (lm-eval tasks)."""
    return "choice" if key.startswith("choice.") else None if key.startswith("harness.") else "heldout"


def overlap_notes(report: dict) -> list[str]:
    """The lines under the table that say which parts overlap the training data, or why that was not checked."""
    found = report.get("overlap", {})
    if "unchecked" in found:
        return [f"\nOverlap with the training data not checked: {found['unchecked']}."]
    return [
        f"\n{OVERLAP_MARK.strip()}: {len(hit['rows'])} of {hit['of']} {PART_UNITS[part]} hold text of the run's "
        f"training rows (first: {', '.join(str(r) for r in hit['rows'][:5])}); their scores measure memory, not skill."
        for part, hit in found.items()
    ]


def markdown(report: dict, other: dict | None = None) -> str:
    """One column per model; with ``other`` (the earlier / baseline report) first, and a column of changes where
    both measured the same thing (``not_comparable``: the others read "not comparable", with the reason below).
    A score measured on rows the training data holds is marked (``OVERLAP_MARK``), with the counts below."""
    overlaps = report.get("overlap", {})
    rows = [
        (k, label + (OVERLAP_MARK if part_of(k) in overlaps else ""), v, u) for k, label, v, u in metric_rows(report)
    ]
    if other is None:
        lines = [f"| metric | {report['model']['name']} |", "|---|---|"]
        lines += [f"| {label} | {fmt(value, unit)} |" for _, label, value, unit in rows]
        return "\n".join(lines + overlap_notes(report)) + "\n"
    before = {key: value for key, _, value, _ in metric_rows(other)}
    why = not_comparable(report, other)
    lines = [f"| metric | {other['model']['name']} | {report['model']['name']} | change |", "|---|---|---|---|"]
    for key, label, value, unit in rows:
        change = "not comparable" if part_of(key) in why else delta(before.get(key), value, unit)
        lines.append(f"| {label} | {fmt(before.get(key), unit)} | {fmt(value, unit)} | {change} |")
    lines += [f"\nNot comparable: {reason}." for reason in why.values()]
    return "\n".join(lines + overlap_notes(report)) + "\n"


def read_report(path: str | Path) -> dict:
    """A report from its file, or from the folder ``kotune eval --out`` wrote it to."""
    from kotune.data.read import DataError

    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such report; give an {REPORT_FILE} or the folder `kotune eval --out` wrote")
    return json.loads(path.read_text(encoding="utf-8"))


def shareable(report: dict) -> dict:
    """``report`` naming no folder of this machine: the model's path, the held-out data and the multiple-choice file
    by their last part (a report is something users share). Replies and rows stay as generated."""
    report = {**report, "model": {**report["model"], "path": portable(report["model"].get("path"))}}
    if "data" in report:
        report["data"] = portable(report["data"])
    if "choice" in report:
        report["choice"] = {**report["choice"], "file": portable(report["choice"].get("file"))}
    return report


def write_report(out: Path, report: dict, other: dict | None = None) -> Path:
    """``eval_report.json`` (with the side-by-side when compared) and ``eval_report.md``; returns the table's path."""
    out.mkdir(parents=True, exist_ok=True)
    report = shareable(report)
    table = markdown(report, other)
    if other is not None:
        report = {**report, "compared_with": other["model"]}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / TABLE_FILE).write_text(table, encoding="utf-8")
    return out / TABLE_FILE
