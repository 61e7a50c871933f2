"""What a run trained on, recorded in each checkpoint so a resume cannot silently continue on something else.

A fingerprint has five parts: the data files (content hashes), the tokenized examples (which also catches
hub datasets and encoding changes), the tokenizer, the prompt template, and the training-relevant config
values. Resuming compares the checkpoint's fingerprint with the current one and lists what changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kotune import output
from kotune.config import Config
from kotune.hashing import examples_hash, file_sha256, tokenizer_hash
from kotune.run_folder import FINGERPRINT
from kotune.security import redact
from kotune.training.checkpoint import CheckpointError

NOT_FINGERPRINTED = frozenset(
    {
        # Where things are, not what they are: data and template contents are hashed on their own.
        "model.allow_pickle",
        "data.path",
        "data.validation_path",
        "data.split",
        "data.template",
        "data.chat_template",
        "data.cache",
        "train.output_dir",
        # Memory, speed and kernels: the same maths up to rounding, so a resume may switch them.
        "model.gradient_checkpointing",
        "model.attn_implementation",
        "model.trust_remote_code",
        "train.kernels",
        "train.distributed",  # DDP or FSDP: the same steps (tests/test_fsdp.py), and the same checkpoints
        # Bookkeeping that does not touch the weights.
        "train.eval_steps",
        "train.eval_at_start",
        "train.save_steps",
        "train.save_total_limit",
        "train.load_best_model_at_end",
        "train.logging_steps",
        "train.report_to",
        "train.run_name",
        "train.max_bad_steps",
        "train.min_free_disk_gb",
    }
)
"""Config keys a resume may change. Every other key, including ones added later, is fingerprinted."""

RUN_END = ("train.max_steps", "train.num_epochs")
"""Fingerprinted, but a resume may move them, and says so: they only set where the run ends, so a finished run can
be extended. Weights, optimizer state, RNG and data position carry over exactly; the learning-rate schedule (a
function of the step and the total) is recomputed for the new end, so the steps after the resume differ from the
old run's plan, which is why the change is stated rather than silent."""


class FingerprintMismatch(CheckpointError):
    """Resuming would continue on different data, tokenizer, template or config; the message lists what."""


def data_files(cfg: Config) -> dict[str, str]:
    """``split:relative name`` -> content hash of every local data file; hub datasets by name and split. With
    several ``data.sources`` the split is ``train[source name]``."""
    from kotune.data.mixture import source_list
    from kotune.data.read import is_local, local_files

    sources = source_list(cfg.data)
    specs = [(f"train[{s.label()}]" if len(sources) > 1 else "train", s.path, s.split) for s in sources]
    specs.append(("validation", cfg.data.validation_path, cfg.data.split))
    out: dict[str, str] = {}
    for split, spec, hub_split in specs:
        if spec is None:
            continue
        if not is_local(spec):
            out[f"{split}:hub:{spec}[{hub_split}]"] = "hub dataset (compared through the examples)"
            continue
        root = Path(spec)
        for file in local_files(spec):
            name = file.relative_to(root).as_posix() if root.is_dir() else file.name
            out[f"{split}:{name}"] = file_sha256(file)
    return out


def template_hash(template, cfg: Config) -> str:
    """Hash of the prompt template's texts and of a chat template file named by the config."""
    parts = [template.prompt_input, template.prompt_no_input]
    chat = cfg.data.chat_template
    if chat is not None and Path(chat).is_file():
        parts.append(Path(chat).read_text(encoding="utf-8"))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def training_config(cfg: Config) -> dict[str, Any]:
    """``section.key`` -> value for every key that changes what training computes."""
    flat = {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}
    # A source's path is where it is, like data.path; its files are hashed by data_files.
    flat["data.sources"] = [{k: v for k, v in s.items() if k != "path"} for s in flat.get("data.sources", [])]
    return {k: v for k, v in flat.items() if k not in NOT_FINGERPRINTED}


def compute(cfg: Config, tokenizer, template, train, validation) -> dict[str, Any]:
    """The run's fingerprint, JSON-ready, with anything token-like redacted (it is saved in checkpoints)."""
    fingerprint = {
        "data": data_files(cfg),
        "examples": examples_hash(train, validation),
        "tokenizer": tokenizer_hash(tokenizer),
        "template": template_hash(template, cfg),
        "config": training_config(cfg),
    }
    return json.loads(redact(json.dumps(fingerprint, ensure_ascii=False)))


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two fingerprints (empty when they match)."""
    out: list[str] = []
    old_files, new_files = saved.get("data", {}), current.get("data", {})
    for name in sorted(set(old_files) | set(new_files)):
        if name not in new_files:
            out.append(f"data file {name}: no longer present")
        elif name not in old_files:
            out.append(f"data file {name}: new")
        elif old_files[name] != new_files[name]:
            out.append(f"data file {name}: content changed (sha256 {old_files[name][:12]} -> {new_files[name][:12]})")
    for part, what in (
        ("examples", "tokenized training / validation rows"),
        ("tokenizer", "tokenizer"),
        ("template", "prompt template"),
    ):
        if saved.get(part) != current.get(part):
            out.append(f"{what}: changed")
    old_cfg, new_cfg = saved.get("config", {}), current.get("config", {})
    keys = set(old_cfg) | set(new_cfg)
    if "auto" in (old_cfg.get("data.format"), new_cfg.get("data.format")):
        # ``auto`` names no format, the one it detected does (the run's saved kotune_config.yaml holds it): the same
        # rows read either way tokenize alike, and the examples' hash above says whether they did
        keys.discard("data.format")
    return out + config_changes(old_cfg, new_cfg, sorted(keys - set(RUN_END)))


def config_changes(old: dict[str, Any], new: dict[str, Any], keys) -> list[str]:
    """``config KEY: old -> new`` for each of ``keys`` whose value differs."""
    changed = [k for k in keys if old.get(k, "<unset>") != new.get(k, "<unset>")]
    return [f"config {k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed]


def check_resume(folder: Path, current: dict[str, Any], force: bool, log=output.info) -> None:
    """Refuse to resume from ``folder`` if its fingerprint differs from ``current`` (``force`` only warns)."""
    path = folder / FINGERPRINT
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changes = differences(saved, current)
        if moved := config_changes(saved.get("config", {}), current["config"], RUN_END):
            log(f"kotune: the run's end moved ({'; '.join(moved)}); the learning-rate schedule is recomputed for it")
    else:
        changes = [f"{folder} has no {FINGERPRINT} (written by an older kotune), so nothing can be checked"]
    if not changes:
        return
    listing = "\n  - ".join(changes)
    if force:
        output.warn(f"resuming from {folder} with --force although:\n  - {listing}")
        return
    raise FingerprintMismatch(
        f"cannot resume from {folder}; since it was written:\n  - {listing}\n"
        "Restore what changed, start a new run in another train.output_dir, or pass --force to resume anyway "
        "(the run then no longer matches an uninterrupted one)."
    )
