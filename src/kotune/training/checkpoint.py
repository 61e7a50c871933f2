"""Checkpoints: everything a run needs to continue exactly, in safetensors + JSON, written atomically.

A checkpoint folder is first written under a temporary name and renamed when complete; a ``COMPLETE``
marker holding the files' checksums is the last thing written. Loading checks the marker and checksums,
and refuses a folder holding pickle files (kotune never writes one; a transformers Trainer checkpoint does).

Contents of ``checkpoint-STEP/``: the adapter (``adapter_model.safetensors`` + config), ``optimizer.safetensors``,
``rng.safetensors`` (torch CPU / CUDA generators), ``trainer_state.json`` (step counters, data position,
best eval, Python RNG, the optimizer's non-tensor state), ``fingerprint.json`` (see ``kotune.training.fingerprint``),
``best_adapter.safetensors`` once an evaluation has run, ``objective.safetensors`` when the objective needs more
than that to go on (``Objective.checkpoint_tensors``: GRPO's completions inside a group of ``grpo.iterations``
steps), and ``COMPLETE``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kotune import __version__, output
from kotune.data.read import jsonl_lines
from kotune.errors import KotuneError
from kotune.hashing import file_sha256
from kotune.run_folder import (
    ADAPTER,
    ADAPTER_CONFIG,
    BEST,
    BEST_ADAPTER,
    CHECKPOINT_MARKER,
    CHECKPOINT_PREFIX,
    FINGERPRINT,
)
from kotune.security import inside, pickle_files

STATE = "trainer_state.json"
OBJECTIVE = "objective.safetensors"


class CheckpointError(KotuneError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the folder and file."""


def flatten_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a nested state dict into tensors (for safetensors) and everything else (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().to("cpu").contiguous()
        elif isinstance(value, dict):
            sub_tensors, sub_rest = flatten_state(value, name + "/")
            tensors.update(sub_tensors)
            rest[str(key)] = sub_rest
        else:
            rest[str(key)] = value
    return tensors, rest


def unflatten_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of ``flatten_state``; integer-looking keys of the optimizer's ``state`` become ints again."""
    out: dict[Any, Any] = {}
    for key, value in rest.items():
        name = f"{prefix}{key}"
        out[_key(key)] = unflatten_state(tensors, value, name + "/") if isinstance(value, dict) else value
    for name, tensor in tensors.items():
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(_key(part), {})
        node[_key(parts[-1])] = tensor
    return out


def _key(text: str) -> Any:
    return int(text) if text.isdigit() else text


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def estimate_size(model, optimizer, with_best: bool) -> int:
    """Bytes a checkpoint will take: the adapter (twice with the best one), the optimizer state, ~1 MiB of JSON."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * p.element_size() for p in trainable)
    moments = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    # Before the first step AdamW has no state yet; it will hold two float32 moments per parameter.
    opt = sum(t.numel() * t.element_size() for t in moments) or 8 * sum(p.numel() for p in trainable)
    return adapter * (2 if with_best else 1) + opt + (1 << 20)


def check_free_space(output_dir: Path, needed: int, keep_free: int, what: str = "a checkpoint") -> None:
    """Raise CheckpointError if writing ``needed`` bytes (of ``what``) would leave less than ``keep_free`` free."""
    free = shutil.disk_usage(output_dir).free
    if free - needed >= keep_free:
        return
    previous = latest_good(output_dir, log=lambda _: None)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint has been written yet"
    raise CheckpointError(
        f"{output_dir}: {free / 1e9:.2f} GB free; {what} needs about {needed / 1e6:.1f} MB and "
        f"train.min_free_disk_gb asks to keep {keep_free / 1e9:.2f} GB free; {kept}. Free some space "
        "(or lower train.save_total_limit) and resume with --resume"
    )


def write_checkpoint(
    output_dir: Path,
    step: int,
    model,
    optimizer,
    state: dict[str, Any],
    fingerprint: dict[str, Any] | None = None,
    keep_free: int = 0,
    objective: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoint-STEP`` atomically: adapter, optimizer, RNG, trainer state, fingerprint, best adapter,
    and the objective's tensors when there are any.

    The disk is checked first; a failed write (e.g. disk full) removes the partial folder and leaves the
    previous checkpoints as they were. The new checkpoint is verified before this returns.
    """
    final = inside(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = inside(output_dir, f".tmp-{CHECKPOINT_PREFIX}{step}")
    best = inside(output_dir, BEST) / ADAPTER
    check_free_space(output_dir, estimate_size(model, optimizer, best.is_file()), keep_free)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_files(tmp, model, optimizer, state, fingerprint, best, objective)
        _fsync_tree(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{final}: could not be written ({exc}); the previous checkpoints are intact") from exc
    replace_dir(tmp, final)
    verify(final)
    return final


def _write_files(tmp: Path, model, optimizer, state, fingerprint, best: Path, objective) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    opt_tensors, opt_rest = flatten_state(optimizer.state_dict())
    save_file(opt_tensors or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    (tmp / STATE).write_text(json.dumps({**state, "optimizer": opt_rest, "rng": rng_meta}, indent=1), encoding="utf-8")
    if fingerprint is not None:
        (tmp / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1, ensure_ascii=False), encoding="utf-8")
    if best.is_file():  # the best-eval adapter so far, so a resume can restore best/ as it was at this step
        shutil.copyfile(best, tmp / BEST_ADAPTER)
    if objective:
        save_file(objective, tmp / OBJECTIVE)
    checksums = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    marker = {"step": state.get("step"), "kotune": __version__, "sha256": checksums}
    (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")  # last: the folder is complete


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` to ``final``; an older ``final`` is moved aside first, then deleted."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def save_adapter(model, folder: Path) -> Path:
    """``model.save_pretrained`` into ``folder`` atomically (written beside it, then renamed)."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    _fsync_tree(tmp)
    replace_dir(tmp, folder)
    return folder


def write_adapter(model, output_dir: Path, weights: Path | None, keep_free: int) -> None:
    """The run's adapter into ``output_dir``: free space checked, written beside, fsynced, renamed into place.

    ``weights``: an ``adapter_model.safetensors`` to write instead of the model's own weights (the best one).
    Each file is replaced whole, so a crash or a full disk leaves the old file or the new one, never a torn one.
    """
    needed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) + (1 << 20)
    check_free_space(output_dir, needed, keep_free, what="the final adapter")
    tmp = inside(output_dir, ".tmp-adapter")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if weights is not None:
            shutil.copyfile(weights, tmp / ADAPTER)
        _fsync_tree(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{output_dir}: the final adapter could not be written ({exc}); the last checkpoint holds it: "
            "free some space and run the same command with --resume to write it"
        ) from exc
    for file in sorted(tmp.iterdir()):
        os.replace(file, output_dir / file.name)
    tmp.rmdir()
    _fsync_dir(output_dir)


def restore_best(checkpoint: Path, output_dir: Path) -> None:
    """Make ``best/`` what it was when ``checkpoint`` was written (absent if there was no best adapter yet)."""
    best = inside(output_dir, BEST)
    if not (checkpoint / BEST_ADAPTER).is_file():
        shutil.rmtree(best, ignore_errors=True)
        return
    tmp = best.with_name(f".tmp-{BEST}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.copyfile(checkpoint / BEST_ADAPTER, tmp / ADAPTER)
    shutil.copyfile(checkpoint / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
    replace_dir(tmp, best)


def remove_partial(output_dir: Path) -> list[Path]:
    """Delete folders a killed save left behind (``.tmp-*``, ``.old-*``); returns what was removed."""
    leftovers = [p for p in output_dir.glob(".tmp-*") if p.is_dir()]
    leftovers += [p for p in output_dir.glob(".old-*") if p.is_dir()]
    for folder in leftovers:
        shutil.rmtree(folder)
    return leftovers


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the directory that holds it (not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify(folder: Path) -> None:
    """Raise CheckpointError unless the folder is complete and every checksum matches."""
    marker = folder / CHECKPOINT_MARKER
    if not marker.is_file():
        raise CheckpointError(f"{folder}: incomplete (no {CHECKPOINT_MARKER} marker)")
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{folder}: {CHECKPOINT_MARKER} marker is unreadable") from None
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if file_sha256(path) != digest:
            raise CheckpointError(f"{folder}: {name} does not match its checksum (corrupt or changed)")


def checkpoint_step(folder: Path) -> int:
    """The optimizer steps done when ``folder`` (a verified checkpoint) was written."""
    return json.loads((folder / STATE).read_text(encoding="utf-8"))["step"]


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest step first."""
    found = [
        p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_good(output_dir: Path, log=output.info, before: int | None = None) -> Path | None:
    """The newest checkpoint that verifies (``before``: of a step below it); broken newer ones are reported and
    skipped."""
    for folder in reversed(list_checkpoints(output_dir)):
        if before is not None and checkpoint_step(folder) >= before:
            continue
        try:
            verify(folder)
            return folder
        except CheckpointError as exc:
            log(f"kotune: skipping {exc}")
    return None


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(adapter weights, optimizer state dict, trainer state) of a verified checkpoint."""
    if found := pickle_files(folder):
        raise CheckpointError(
            f"{folder}: holds pickle files ({', '.join(p.name for p in found)}); kotune checkpoints are "
            "safetensors only and kotune never unpickles (pickle can run code). Is this a transformers "
            "Trainer checkpoint? Resume from a kotune checkpoint-N folder instead"
        )
    if not (folder / "optimizer.safetensors").is_file():
        raise CheckpointError(
            f"{folder}: optimizer.safetensors is missing; refusing to restart the optimizer silently "
            "(resume from an earlier checkpoint-N, or start a new run)"
        )
    verify(folder)
    state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    opt_tensors = load_file(folder / "optimizer.safetensors")
    opt_tensors.pop("_empty", None)
    optimizer_state = unflatten_state(opt_tensors, state.pop("optimizer"))
    adapter = load_file(folder / ADAPTER)
    state["rng_tensors"] = load_file(folder / "rng.safetensors")
    state["objective_tensors"] = load_file(folder / OBJECTIVE) if (folder / OBJECTIVE).is_file() else {}
    return adapter, optimizer_state, state


def trim_metrics(path: Path, last_step: int) -> int:
    """Drop metrics.jsonl records after ``last_step`` (and a line torn by a kill); returns how many went.

    A resumed run replays the steps after its checkpoint, so their old records would otherwise appear twice.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in jsonl_lines(path.read_text(encoding="utf-8")):
        if not line:
            continue
        try:
            keep = json.loads(line)["step"] <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def prune(output_dir: Path, keep: int | None, protect: set[Path]) -> None:
    """Delete the oldest checkpoints beyond ``keep``, never one in ``protect`` (the newest good, the best)."""
    if keep is None:
        return
    folders = list_checkpoints(output_dir)
    excess = len(folders) - keep
    for folder in folders:
        if excess <= 0:
            break
        if folder in protect:
            continue
        shutil.rmtree(folder)
        excess -= 1
