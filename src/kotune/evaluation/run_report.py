"""``report.md`` of a run folder: curves as PNG files, figures from ``metrics.jsonl``, the data audit, the resolved
config, and the eval and merge reports when present. Plain Markdown and PNG, readable without kotune.

Plots are drawn with matplotlib, part of kotune's base install; an environment where it cannot be imported (a broken
or partial install) still gets the report, which says why its curves are missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kotune.evaluation.tables import TABLE_FILE
from kotune.run_folder import (
    CONFIG,
    MERGE_REPORT,
    RUN_REPORT,
    SUMMARY,
    merge_targets_note,
    read_json,
    read_metrics,
    read_summary,
)
from kotune.security import portable

PLOTS_DIR = "report"
CURVES = (
    ("loss", "Loss", ("loss", "eval_loss")),
    ("reward", "Reward (GRPO) and its components", ("reward", "eval_reward")),
    ("lr", "Learning rate", ("lr",)),
    ("tokens_per_s", "Tokens per second", ("input_tokens_per_s", "tokens_per_s")),
    ("memory", "GPU memory (GiB, peak)", ("peak_allocated_gib", "peak_reserved_gib")),
)
"""(file name, title, metrics.jsonl keys drawn on it); a plot with none of its keys in the log is left out. The
reward plot also draws each reward component (``reward[NAME]``, ``curve_keys``)."""
LEGEND = {
    "loss": "training",
    "eval_loss": "validation",
    "input_tokens_per_s": "input",
    "tokens_per_s": "trained",
    "reward": "training",
    "eval_reward": "held out (greedy)",
    "peak_allocated_gib": "allocated",
    "peak_reserved_gib": "reserved",
}


def curve_keys(name: str, keys: tuple[str, ...], records: list[dict]) -> tuple[str, ...]:
    """The keys a curve draws: its own, and for the reward each component a GRPO run logged."""
    if name != "reward":
        return keys
    components = sorted({k for r in records for k in r if k.startswith("reward[")})
    return (*keys, *components)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in logged order."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [s for s, _ in points], [v for _, v in points]


def figures(records: list[dict]) -> dict:
    """The numbers the report states, each read straight from metrics.jsonl."""
    _, loss = series(records, "loss")
    eval_steps, eval_loss = series(records, "eval_loss")
    out: dict = {"steps": max((r["step"] for r in records), default=0)}
    if loss:
        out.update(first_loss=loss[0], last_loss=loss[-1])
    if eval_loss:
        out.update(first_eval_loss=eval_loss[0], last_eval_loss=eval_loss[-1], best_eval_loss=min(eval_loss))
        out["best_eval_step"] = eval_steps[eval_loss.index(min(eval_loss))]
    _, reward = series(records, "reward")
    _, eval_reward = series(records, "eval_reward")
    if reward:
        out.update(first_reward=reward[0], last_reward=reward[-1])
    if eval_reward:
        out.update(first_eval_reward=eval_reward[0], last_eval_reward=eval_reward[-1])
    for key in ("input_tokens_per_s", "tokens_per_s"):  # input: what other tools report; trained: supervised
        _, speed = series(records, key)
        if speed:
            out[f"mean_{key}"] = sum(speed) / len(speed)
    return out


def plot(records: list[dict], folder: Path) -> list[tuple[str, Path]] | None:
    """One PNG per curve with data; None when matplotlib cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, keys in CURVES:
        drawn = [(key, *series(records, key)) for key in curve_keys(name, keys, records)]
        drawn = [(key, steps, values) for key, steps, values in drawn if steps]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key, steps, values in drawn:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=LEGEND.get(key, key))
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png")
        plt.close(fig)
        written.append((title, folder / f"{name}.png"))
    return written


def figure_lines(values: dict) -> list[str]:
    labels = {
        "steps": "optimizer steps",
        "first_loss": "first training loss",
        "last_loss": "last training loss",
        "first_eval_loss": "first validation loss",
        "last_eval_loss": "last validation loss",
        "best_eval_loss": "best validation loss",
        "best_eval_step": "step of the best validation loss",
        "mean_input_tokens_per_s": "mean input tokens / s (padding not counted)",
        "mean_tokens_per_s": "mean trained tokens / s",
        "first_reward": "first training reward (mean of the step's completions)",
        "last_reward": "last training reward",
        "first_eval_reward": "first held-out reward (greedy)",
        "last_eval_reward": "last held-out reward",
    }
    lines = ["| figure | value |", "|---|---|"]
    lines += [
        f"| {labels[k]} | {v:.4f} |" if isinstance(v, float) else f"| {labels[k]} | {v} |" for k, v in values.items()
    ]
    return lines


def source_loss_lines(records: list[dict]) -> list[str]:
    """A mixed run's held-out loss per source (``eval_loss[NAME]`` in metrics.jsonl): first, last, best and its step;
    nothing for a run of one source."""
    names = sorted({k[len("eval_loss[") : -1] for r in records for k in r if k.startswith("eval_loss[")})
    lines = ["| source | first | last | best | best step |", "|---|---|---|---|---|"] if names else []
    for name in names:
        steps, values = series(records, f"eval_loss[{name}]")
        best = values.index(min(values))
        lines.append(f"| {name} | {values[0]:.4f} | {values[-1]:.4f} | {values[best]:.4f} | {steps[best]} |")
    return lines


def section(title: str, body: list[str]) -> list[str]:
    return ["", f"## {title}", "", *body]


def head_lines(run: Path, records: list[dict]) -> list[str]:
    """The title and what the figures are: a run without ``run_summary.json`` (written last) has not finished, so
    the report says it is a snapshot, not the run's result."""
    lines = [f"# Run report: {run.name}", "", f"Run folder `{run.name}`; figures from `metrics.jsonl`."]
    if read_summary(run) is None:
        step = max((r["step"] for r in records), default=0)
        lines += [
            "",
            f"**This run has not finished** (no `{SUMMARY}` yet): it is still training, or was stopped before its "
            f"end. Figures are as of step {step}; run `kotune report` again when it ends.",
        ]
    return lines


def audit_lines(run: Path) -> list[str]:
    summary = read_summary(run)
    if summary is None:
        return [f"The data audit is recorded in `{SUMMARY}` when the run finishes."]
    audit = summary.get("audit")
    if not audit:
        return ["No audit summary was recorded with this run (runs before kotune wrote it); `kotune data audit` it."]
    return ["```", *audit, "```"]


def write_run_report(run: str | Path) -> Path:
    """Write ``RUN/report.md`` (and its PNGs under ``RUN/report/``); returns its path."""
    run = Path(run)
    records = read_metrics(run)
    lines = head_lines(run, records)
    lines += section("Figures", figure_lines(figures(records)))
    by_source = source_loss_lines(records)
    if by_source:
        lines += section("Validation loss by source", by_source)
    plots = plot(records, run / PLOTS_DIR)
    if plots is None:
        body = [
            "No plots: matplotlib (a kotune dependency) could not be imported in this environment; "
            "reinstall kotune (`pip install kotune`), then `kotune report`."
        ]
    else:
        body = [f"![{title}]({path.relative_to(run).as_posix()})" for title, path in plots] or ["Nothing logged yet."]
    lines += section("Curves", body)
    lines += section("Data audit", audit_lines(run))
    for folder in ("eval", "eval-base"):
        table = run / folder / TABLE_FILE
        if table.is_file():
            lines += section(f"Evaluation (`{folder}/`)", [table.read_text(encoding="utf-8").rstrip()])
    merge = read_json(run / "merged" / MERGE_REPORT)
    if merge is not None:
        note = merge_targets_note(merge)
        body = [
            "```json",
            json.dumps(portable(merge), indent=1, ensure_ascii=False),
            "```",
            *(["", note] if note else []),
        ]
        lines += section(f"Merge report (`merged/{MERGE_REPORT}`)", body)
    config = run / CONFIG
    if config.is_file():
        values = portable(yaml.safe_load(config.read_text(encoding="utf-8")))
        body = ["```yaml", yaml.safe_dump(values, sort_keys=False, allow_unicode=True).rstrip(), "```"]
        lines += section("Resolved config (local paths shortened to their last part)", body)
    path = run / RUN_REPORT
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
