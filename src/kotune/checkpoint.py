"""Checkpoints: everything a run needs to continue exactly, in safetensors + JSON, written atomically.

A checkpoint folder is first written under a temporary name and renamed when complete; a ``COMPLETE``
marker holding the files' checksums is the last thing written. Loading checks the marker and checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(output_dir: Path, step: int, model, optimizer, state: dict[str, Any]) -> Path:
    """Write ``checkpoint-STEP`` atomically: adapter, optimizer, RNG and trainer state, then the marker."""
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".tmp-{PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    opt_tensors, opt_rest = flatten_state(optimizer.state_dict())
    save_file(opt_tensors or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    (tmp / "trainer_state.json").write_text(
        json.dumps({**state, "optimizer": opt_rest, "rng": rng_meta}, indent=1), encoding="utf-8"
    )
    checksums = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    marker = tmp / MARKER
    marker.write_text(json.dumps({"step": step, "sha256": checksums}, indent=1), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())


def verify(folder: Path) -> None:
    """Raise CheckpointError unless the folder is complete and every checksum matches."""
    marker = folder / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{folder}: incomplete (no {MARKER} marker)")
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{folder}: {MARKER} marker is unreadable") from None
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if sha256(path) != digest:
            raise CheckpointError(f"{folder}: {name} does not match its checksum (corrupt or changed)")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest step first."""
    found = [p for p in output_dir.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_good(output_dir: Path, log=print) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are reported and skipped."""
    for folder in reversed(list_checkpoints(output_dir)):
        try:
            verify(folder)
            return folder
        except CheckpointError as exc:
            log(f"kotune: skipping {exc}")
    return None


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(adapter weights, optimizer state dict, trainer state) of a verified checkpoint."""
    verify(folder)
    if not (folder / "optimizer.safetensors").is_file():
        raise CheckpointError(f"{folder}: optimizer state is missing; refusing to restart the optimizer silently")
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    opt_tensors = load_file(folder / "optimizer.safetensors")
    opt_tensors.pop("_empty", None)
    optimizer_state = unflatten_state(opt_tensors, state.pop("optimizer"))
    adapter = load_file(folder / "adapter_model.safetensors")
    state["rng_tensors"] = load_file(folder / "rng.safetensors")
    return adapter, optimizer_state, state


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
