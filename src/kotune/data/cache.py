"""Tokenized data cached on disk, under a key made from everything that decides the tokens.

The key hashes the data files' bytes, the tokenizer (``hashing.tokenizer_hash``: vocabulary, merges, added and
special tokens), the prompt and chat templates, the tokenization options and this cache's format version; change
any of them and the key changes. An entry is a folder ``<cache>/data/<key>/`` holding ``tokens.safetensors`` (the
flat arrays of an ``Encoded``) and ``meta.json`` (reasons, format, audit report). Nothing is pickled. Entries are
written to a temporary folder and renamed into place, so a crashed or concurrent run never leaves a half entry.
Loading memory-maps the arrays: a cached run reads only the tokens it trains on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kotune import __version__
from kotune.config import DataConfig
from kotune.data.examples import Encoded, ExampleTable
from kotune.data.read import is_local, local_files
from kotune.hashing import file_sha256, tokenizer_hash
from kotune.paths import cache_root

CACHE_VERSION = 3
"""Bump when rendering or encoding changes the tokens, so older entries stop matching."""

TOKENS_FILE, META_FILE = "tokens.safetensors", "meta.json"
SAFETENSORS_DTYPES = {"I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}


def data_cache_dir() -> Path:
    return cache_root() / "data"


def cache_key(spec: str, data_cfg: DataConfig, tokenizer, templates: dict[str, str | None]) -> str | None:
    """The entry name for one data source under these settings; None for a hub dataset (not cached here)."""
    if not is_local(spec) or not Path(spec).exists():
        return None
    root = Path(spec)
    files = {(f.relative_to(root).as_posix() if root.is_dir() else f.name): file_sha256(f) for f in local_files(spec)}
    inputs = {
        "version": [CACHE_VERSION, __version__],
        "files": files,
        "tokenizer": tokenizer_hash(tokenizer),
        "templates": templates,
        "options": {
            "format": data_cfg.format,
            "columns": data_cfg.columns,
            "cutoff_len": data_cfg.cutoff_len,
            "train_on_inputs": data_cfg.train_on_inputs,
            "train_on_all_turns": data_cfg.train_on_all_turns,
            "last_turn_only": data_cfg.last_turn_only,
            "mask_history_reasoning": data_cfg.mask_history_reasoning,
            "drop_empty_think": data_cfg.drop_empty_think,
        },
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def save(key: str, encoded: Encoded, meta: dict[str, Any]) -> Path:
    """Write an entry atomically; returns its folder."""
    from safetensors.numpy import save_file

    final = data_cache_dir() / key
    tmp = data_cache_dir() / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table = encoded.examples
    arrays = {
        "ids": table.ids,
        "labels": table.labels,
        "starts": table.starts,
        "ends": table.ends,
        "rows": table.rows,
        "length": encoded.length,
        "truncated": encoded.truncated,
        "eos_lost": encoded.eos_lost,
        "skip": encoded.skip,
    }
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / TOKENS_FILE))
    meta = {**meta, "reasons": encoded.reasons}
    (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    try:
        os.replace(tmp, final)
    except OSError:  # another process wrote the same entry first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read-only arrays over a safetensors file's bytes (its layout: u64 header size, JSON header, data)."""
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    (header_size,) = struct.unpack("<Q", bytes(buffer[:8]))
    header = json.loads(bytes(buffer[8 : 8 + header_size]))
    base = 8 + header_size
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        arrays[name] = buffer[base + begin : base + end].view(dtype).reshape(info["shape"])
    return arrays


def load(key: str) -> tuple[Encoded, dict[str, Any]] | None:
    """The entry's encoding and metadata, or None when there is no complete entry."""
    folder = data_cache_dir() / key
    if not (folder / META_FILE).is_file() or not (folder / TOKENS_FILE).is_file():
        return None
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    a = _map_safetensors(folder / TOKENS_FILE)
    table = ExampleTable(a["ids"], a["labels"], a["starts"], a["ends"], a["rows"])
    return Encoded(table, a["length"], a["truncated"], a["eos_lost"], a["skip"], meta["reasons"]), meta
