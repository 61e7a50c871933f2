"""Start, resume and stop ``kotune train`` from the page.

Each run is its own ``kotune train`` process in a session of its own (``start_new_session``): closing the page or
stopping the server does not end it. Stop sends SIGTERM to the process holding the run's lock, which kotune's
training turns into a checkpoint and a clean exit (``training/signals.py``), so the run can be resumed; a run
started in a terminal is stopped the same way.

The page keeps, under ``RUNS_DIR/.kotune-ui/``, each command it ran (``launches/``, with its output in ``logs/``)
and the configs edited in it (``configs/``); the run folders hold only what ``kotune train`` writes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from kotune.config import ConfigError
from kotune.config_load import config_from_text
from kotune.run_folder import CONFIG
from kotune.security import redact
from kotune.ui.runs import UI_DIR, lock_holder

CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")
LOG_TAIL = 8000
"""Characters of a launched command's output the page shows."""

_children: dict[int, subprocess.Popen] = {}
"""The processes this server started, polled so that ended ones do not linger as zombies."""


class LaunchError(ConfigError):
    """A launch, resume or stop the page cannot do; the message says why."""


def ui_folder(root: Path, part: str) -> Path:
    folder = root / UI_DIR / part
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_config(text: str, root: Path, where: str = "config"):
    """The config in ``text``, checked by kotune's own loader, and its output folder inside ``root`` (the page shows
    and stops only runs there). Raises ConfigError naming what is wrong."""
    cfg = config_from_text(text, where)
    output = Path(cfg.train.output_dir).resolve()
    base = root.resolve()
    if base not in output.parents:
        raise ConfigError(
            f"{where}: train.output_dir {cfg.train.output_dir} is outside the runs directory {base}; "
            f"set it to a folder inside it, e.g. {base / 'my-run'}"
        )
    return cfg


def save_config(root: Path, name: str, text: str) -> Path:
    """Write a config edited in the page to ``.kotune-ui/configs/NAME.yaml`` after checking it."""
    stem = name.removesuffix(".yaml")
    if not CONFIG_NAME.fullmatch(stem):
        raise LaunchError(f"config name {name!r}: use letters, digits, '.', '_' and '-' only")
    check_config(text, root, f"{stem}.yaml")
    path = ui_folder(root, "configs") / f"{stem}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def train_command(config: Path, resume: bool) -> list[str]:
    """The exact ``kotune train`` command line a launch runs."""
    return [sys.executable, "-m", "kotune.cli", "train", str(config), *(["--resume"] if resume else [])]


def launch(root: Path, config: Path, resume: bool = False) -> dict:
    """Start ``kotune train CONFIG [--resume]`` detached from this server; returns its record."""
    cfg = check_config(config.read_text(encoding="utf-8"), root, str(config))
    output = Path(cfg.train.output_dir).resolve()
    if lock_holder(output) is not None:
        raise LaunchError(f"{output.name} is already running; stop it first")
    argv = train_command(config, resume)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{len(_children)}"
    log = ui_folder(root, "logs") / f"{stamp}.log"
    with log.open("wb") as out:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _children[child.pid] = child
    record = {
        "run": output.relative_to(root.resolve()).as_posix(),
        "command": redact(shlex.join(argv)),
        "config": str(config),
        "pid": child.pid,
        "started": time.time(),
        "log": log.name,
    }
    (ui_folder(root, "launches") / f"{stamp}.json").write_text(json.dumps(record), encoding="utf-8")
    return record


def reap() -> None:
    """Collect the exit status of ended children (no zombies while the server runs)."""
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]


def launches(root: Path, run: str | None = None) -> list[dict]:
    """The commands the page ran (for ``run`` only, when given), newest first, each with its output's tail."""
    reap()
    folder = root / UI_DIR / "launches"
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
    records = [r for r in records if run is None or r["run"] == run]
    for record in records:
        log = root / UI_DIR / "logs" / record["log"]
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        record["output"] = redact(text[-LOG_TAIL:])
    return records[::-1]


def resume_config(root: Path, folder: Path, configs: list[Path]) -> Path:
    """What a resume of the run reads: the config the page last launched it from, else one of ``configs`` (the named
    and saved ones) training into the folder, else the run's saved ``kotune_config.yaml``. The config the run
    started from comes first: it is what the user edits and launches again."""
    run = folder.relative_to(root.resolve()).as_posix()
    for record in launches(root, run):
        if Path(record["config"]).is_file():
            return Path(record["config"])
    for config in configs:
        try:
            if (
                Path(config_from_text(config.read_text(encoding="utf-8"), str(config)).train.output_dir).resolve()
                == folder
            ):
                return config
        except ConfigError:
            continue
    return folder / CONFIG


def stop(folder: Path) -> int:
    """SIGTERM to the ``kotune train`` process training into ``folder``; returns its pid."""
    pid = lock_holder(folder)
    if pid is None:
        raise LaunchError(f"{folder.name} is not running")
    if not is_kotune_train(pid):  # the lock names another process (a tool holding it): never signal that
        raise LaunchError(f"{folder.name}: its lock is held by pid {pid}, which is not `kotune train`; not stopped")
    os.kill(pid, signal.SIGTERM)
    return pid


def is_kotune_train(pid: int) -> bool:
    """Whether ``pid`` runs ``kotune train`` (the console script, ``-m kotune.cli``, or under torchrun)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return "train" in argv and any(word == "kotune.cli" or Path(word).name == "kotune" for word in argv)
