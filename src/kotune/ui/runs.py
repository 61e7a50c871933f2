"""The run folders under a directory, read for the page: state, curves, plan, ETA, audit and eval reports.

Everything here reads what ``kotune train`` (and ``merge``, ``eval``) wrote, nothing the page wrote, so a run started
from a terminal and one started from the page look the same. A run's state:

* ``running``: a process holds the folder's lock (``training/claim.py``); the kernel drops it when that ends.
* ``finished``: ``run_summary.json`` is there (written last, whole).
* ``interrupted``: stopped with a complete checkpoint at its last logged step, as a SIGINT / SIGTERM leaves it
  (``training/signals.py``): ``--resume`` continues it.
* ``failed``: ended any other way (an error, ``kill -9``, a crash before the first step).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kotune.config import ConfigError
from kotune.config_load import load_config
from kotune.evaluation.tables import REPORT_FILE, TABLE_FILE
from kotune.run_folder import (
    CHECKPOINT_MARKER,
    CHECKPOINT_PREFIX,
    CONFIG,
    LOCK,
    MERGE_REPORT,
    METRICS,
    SUMMARY,
    read_json,
    read_metrics,
)
from kotune.security import SecurityError, inside, redact

UI_DIR = ".kotune-ui"
"""The page's own records inside the runs directory (launched commands, their logs, configs edited in the page)."""
SEARCH_DEPTH = 3
"""How deep under the runs directory run folders are looked for."""
RUN_MARKERS = (CONFIG, METRICS, LOCK, MERGE_REPORT)


class RunNotFound(ConfigError):
    """A run name that is not a run folder inside the runs directory."""


def find_runs(root: Path) -> list[Path]:
    """Run and merged folders under ``root`` (not following links out of it), newest activity first."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
                continue
            if any((entry / marker).is_file() for marker in RUN_MARKERS):
                found.append(entry)
            elif depth < SEARCH_DEPTH and not entry.name.startswith(CHECKPOINT_PREFIX):
                walk(entry, depth + 1)

    walk(root, 1)
    return sorted(found, key=last_activity, reverse=True)


def last_activity(folder: Path) -> float:
    times = [(folder / name).stat().st_mtime for name in (METRICS, SUMMARY, CONFIG, LOCK) if (folder / name).exists()]
    return max(times, default=folder.stat().st_mtime)


def resolve_run(root: Path, name: str) -> Path:
    """The run folder ``name`` (a path relative to ``root``), refused unless it is a run folder inside ``root``."""
    if not name or Path(name).is_absolute() or "\\" in name:
        raise RunNotFound(f"no run named {name!r}")
    try:
        folder = inside(root, name).resolve()
    except SecurityError:
        raise RunNotFound(f"no run named {name!r}") from None
    if folder not in find_runs(root.resolve()):
        raise RunNotFound(f"no run named {name!r} under {root}")
    return folder


# -- state ----------------------------------------------------------------------------------------
def lock_holder(folder: Path) -> int | None:
    """The pid training into ``folder``, None when no process holds its lock.

    Read from /proc/locks rather than by trying the lock: trying would, for an instant, take it from a run that is
    starting."""
    path = folder / LOCK
    if not path.is_file():
        return None
    st = path.stat()
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return _pid_if_alive(path)
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a process waiting for the lock, not holding it
            continue
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == where:
            return int(parts[4])
    return None


def _pid_if_alive(lock: Path) -> int | None:
    """Without /proc/locks: the pid the lock file names, if that process is alive."""
    words = lock.read_text(errors="replace").split()
    if len(words) < 2 or words[0] != "pid" or not words[1].isdigit():
        return None
    try:
        os.kill(int(words[1]), 0)
    except (ProcessLookupError, PermissionError):
        return None
    return int(words[1])


def checkpoints(folder: Path) -> list[int]:
    """The steps of the folder's complete checkpoints, ascending."""
    steps = []
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        number = path.name.removeprefix(CHECKPOINT_PREFIX)
        if number.isdigit() and (path / CHECKPOINT_MARKER).is_file():
            steps.append(int(number))
    return sorted(steps)


def run_state(folder: Path, records: list[dict]) -> str:
    """``running``, ``finished``, ``interrupted`` or ``failed`` (see the module docstring); ``merged`` for a merge."""
    if (folder / MERGE_REPORT).is_file():
        return "merged"
    if lock_holder(folder) is not None:
        return "running"
    if (folder / SUMMARY).is_file():
        return "finished"
    saved = checkpoints(folder)
    last = max((r["step"] for r in records if "loss" in r), default=0)
    return "interrupted" if saved and saved[-1] >= last else "failed"


# -- what the page shows --------------------------------------------------------------------------
def saved_config(folder: Path):
    """The run's resolved config, None when it has none yet or it does not load."""
    try:
        return load_config(folder / CONFIG) if (folder / CONFIG).is_file() else None
    except ConfigError:
        return None


def progress(cfg, records: list[dict]) -> tuple[int, int | None, float | None]:
    """(last step, total steps when ``train.max_steps`` sets them, fraction of the run done)."""
    steps = [r for r in records if "loss" in r]
    step = steps[-1]["step"] if steps else 0
    if cfg is None:
        return step, None, None
    if cfg.train.max_steps:
        return step, cfg.train.max_steps, min(1.0, step / cfg.train.max_steps)
    epoch = steps[-1].get("epoch") if steps else None
    return step, None, (min(1.0, epoch / cfg.train.num_epochs) if epoch is not None else None)


def eta_seconds(folder: Path, state: str, done: float | None, step: int) -> float | None:
    """Seconds left for a running run, from its pace since this process took the lock (model loading included):
    the steps since then over the time since then. None when not running or not yet measurable."""
    if state != "running" or not done or done >= 1 or not step:
        return None
    started = (folder / LOCK).stat().st_mtime
    before = [s for s in checkpoints(folder) if (folder / f"{CHECKPOINT_PREFIX}{s}").stat().st_mtime < started]
    first = before[-1] if before else 0  # a resumed run started from its newest checkpoint
    elapsed = time.time() - started
    if step <= first or elapsed <= 0:
        return None
    share_done_here = done * (step - first) / step
    return elapsed / share_done_here * (1 - done) if share_done_here > 0 else None


def plan(cfg) -> dict | None:
    """What the run was set to do, from its config."""
    if cfg is None:
        return None
    t = cfg.train
    return {
        "model": cfg.model.path,
        "data": cfg.data.path or [s.path for s in cfg.data.sources],
        "objective": t.objective,
        "max_steps": t.max_steps,
        "num_epochs": t.num_epochs,
        "micro_batch_size": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "effective_batch_size": cfg.effective_batch_size(),
        "learning_rate": t.learning_rate,
        "lr_scheduler": t.lr_scheduler,
        "lora_r": cfg.lora.r,
        "quantization": cfg.model.quantization,
        "cutoff_len": cfg.data.cutoff_len,
        "eval_steps": t.eval_steps,
        "save_steps": t.save_steps,
    }


def run_summary_view(root: Path, folder: Path) -> dict:
    """One line of the runs list."""
    records = read_metrics(folder)
    cfg = saved_config(folder)
    state = run_state(folder, records)
    step, total, done = progress(cfg, records)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return {
        "name": folder.relative_to(root.resolve()).as_posix(),
        "state": state,
        "step": step,
        "total_steps": total,
        "done": done,
        "eta_s": eta_seconds(folder, state, done, step),
        "loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "checkpoints": checkpoints(folder),
        "updated": last_activity(folder),
    }


def eval_reports(folder: Path) -> list[dict]:
    """The ``kotune eval`` reports in or under the run folder: where, the model, and its table (with the change from
    the ``--compare`` report when it was made with one)."""
    reports = []
    for path in sorted(folder.rglob(REPORT_FILE)):
        report = read_json(path) or {}
        table = path.with_name(TABLE_FILE)
        reports.append(
            {
                "where": path.parent.relative_to(folder).as_posix(),
                "model": report.get("model", {}).get("name"),
                "compared_with": (report.get("compared_with") or {}).get("name"),
                "table": redact(table.read_text(encoding="utf-8")) if table.is_file() else "",
            }
        )
    return reports


def run_detail(root: Path, folder: Path) -> dict:
    """Everything the run's page shows; text passes ``redact`` so no token reaches the page."""
    cfg = saved_config(folder)
    summary = read_json(folder / SUMMARY)
    config_text = (folder / CONFIG).read_text(encoding="utf-8") if (folder / CONFIG).is_file() else ""
    return {
        **run_summary_view(root, folder),
        "metrics": read_metrics(folder),
        "plan": plan(cfg),
        "config": redact(config_text),
        "audit": (summary or {}).get("audit", []),
        "summary": json.loads(redact(json.dumps(summary, ensure_ascii=False))) if summary else None,
        "evals": eval_reports(folder),
        "merge": read_json(folder / MERGE_REPORT) is not None,
    }
