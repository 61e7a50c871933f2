"""Content hashes kotune records and compares: a file's bytes, and what decides a tokenizer's ids.

Checkpoints (their checksums), fingerprints (data files, tokenizer), the tokenization cache's key, merge reports
and generation's model names all hash through these two functions, so one fact has one definition.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read a MiB at a time so a large weight file never sits in memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Hash of the vocabulary, merges, normalizer, added, special and pad tokens, padding side and chat template.

    ``split_special_tokens`` (special-token text encoded as plain text) changes the ids too; it enters the hash only
    when on, so the hashes checkpoints recorded before it was part of it still match.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "special": tokenizer.special_tokens_map,
        "pad": tokenizer.pad_token,
        "padding_side": tokenizer.padding_side,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    if getattr(tokenizer, "split_special_tokens", False):
        extra["split_special_tokens"] = True
    return hashlib.sha256((model + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()


def model_identity(path: str) -> str:
    """What tells one base model from another without reading all of it: its ``config.json`` and, per weight file,
    its name, size and first and last MiB (weights drawn differently in the same shapes differ there). A hub name
    is its own identity."""
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}"
    digest = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    for weights in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


def examples_hash(*splits) -> str:
    """Hash of the tokenized rows (row id, ids, labels) in order: what the model is actually shown."""
    digest = hashlib.sha256()
    for examples in splits:
        digest.update(b"|split|")
        for e in examples:
            digest.update(array("q", [e.row, len(e.input_ids)]).tobytes())
            digest.update(array("q", e.input_ids).tobytes())
            digest.update(array("q", e.labels).tobytes())
    return digest.hexdigest()
