"""Streaming tokenization (``data.streaming``): a JSON Lines source larger than memory, tokenized in bounded memory.

Rows are read line by line, ``CHUNK_ROWS`` at a time; a chunk is checked, rendered and encoded as a whole source
is (``kotune.data.prepare``), and written to the cache entry's folder as a shard: its tokens appended to two flat
files (``ids.bin``, ``labels.bin``, int32) and its index (rows, example lengths, per-row outcomes) to
``shard-NNNNN.npz``. ``manifest.json`` is rewritten atomically after each shard with the tokens written so far and
the byte position reached in the source files, so an interrupted tokenization truncates the token files to the last
finished shard and continues from there; a run holds ``.lock`` (``fcntl.flock``) while it writes, so two runs never
append to one entry together. Memory holds one chunk, whatever the source's size.

Loading memory-maps the token files: a run reads the tokens of the rows it trains on. The per-row arrays (a few
bytes a row) are read whole. The format is detected on the first chunk and every later chunk must have it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kotune.data.audit import INFO, AuditReport, Finding
from kotune.data.examples import IGNORE, Encoded, ExampleTable
from kotune.data.read import DataError, apply_columns, local_files

CHUNK_ROWS = 20_000
"""Rows read, encoded and written at a time: the memory bound (a chunk's rows, rendered text and tokens)."""
MANIFEST, IDS, LABELS, LOCK = "manifest.json", "ids.bin", "labels.bin", ".lock"
STREAM_NOTE = (
    "streamed (data.streaming): only counts and token lengths are audited; duplicates, contamination and per-row "
    "checks need every row at once (run `kotune data audit` on a sample)"
)


def jsonl_chunks(spec: str, position: list[int], first_row: int, size: int) -> Iterator[tuple[list, list[int]]]:
    """``(rows, position after them)``, ``size`` rows at a time, from ``position`` (file index, byte offset, line
    number) on; rows carry ``_source`` (file and line) and ``_row`` counted from ``first_row``."""
    files = local_files(spec)
    if any(f.suffix != ".jsonl" for f in files):
        raise DataError(f"{spec}: data.streaming reads .jsonl files only; convert the others or set it to false")
    rows: list[dict[str, Any]] = []
    index, offset, number = position
    while index < len(files):
        with files[index].open("rb") as f:
            f.seek(offset)
            while line := f.readline():
                offset, number = offset + len(line), number + 1
                if line.strip():
                    rows.append({**parse_line(line, f"{files[index]} line {number}"), "_row": first_row + len(rows)})
                if len(rows) == size:
                    yield rows, [index, offset, number]
                    first_row, rows = first_row + size, []
        index, offset, number = index + 1, 0, 0
    if rows:
        yield rows, [index, 0, 0]


def parse_line(line: bytes, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError(f"{where} is not UTF-8; convert the file (e.g. `iconv -f cp949 -t utf-8`)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}, expected an object")
    row["_source"] = where
    return row


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"shards": [], "position": [0, 0, 0], "rows": 0, "tokens": 0, "trained": 0, "format": None, "done": False}


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def tokenize_to_shards(spec: str, data, folder: Path, encode_chunk, log: Callable, stop_after: int | None = None):
    """Tokenize ``spec`` into ``folder`` shard by shard, continuing a tokenization that was interrupted there.

    ``encode_chunk(rows, fmt) -> (Encoded, fmt)`` renders and encodes one chunk (rows carry chunk-local ``_row``).
    ``stop_after``: write at most this many shards, then return (tests stand it in for an interruption).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK).open("a") as lock:
        # another run tokenizing this entry holds it: wait, then continue from (or reuse) what it wrote; the
        # kernel drops the lock of a process that dies
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _tokenize_locked(spec, data, folder, encode_chunk, log, stop_after)


def _tokenize_locked(spec: str, data, folder: Path, encode_chunk, log: Callable, stop_after: int | None):
    manifest = read_manifest(folder)
    if manifest["done"]:
        return manifest
    for name in (IDS, LABELS):  # drop the tokens of a shard whose index was never written
        with (folder / name).open("ab") as f:
            f.truncate(manifest["tokens"] * 4)
    if manifest["shards"]:
        log(f"kotune: data: {spec}: continuing an interrupted tokenization at row {manifest['rows']}")
    start, written = time.perf_counter(), 0
    chunks = jsonl_chunks(spec, manifest["position"], manifest["rows"], CHUNK_ROWS)
    for rows, position in chunks:
        first = manifest["rows"]
        local = [{**r, "_row": r["_row"] - first} for r in apply_columns(rows, data.columns, spec)]
        encoded, manifest["format"] = encode_chunk(local, manifest["format"])
        write_shard(folder, len(manifest["shards"]), encoded, first)
        trained = int((np.asarray(encoded.examples.labels) != IGNORE).sum())
        manifest["shards"].append({"rows": len(rows), "tokens": len(encoded.examples.ids), "reasons": encoded.reasons})
        manifest.update(position=position, rows=first + len(rows))
        manifest.update(tokens=manifest["tokens"] + len(encoded.examples.ids), trained=manifest["trained"] + trained)
        write_atomic(folder / MANIFEST, lambda p: p.write_text(json.dumps(manifest), encoding="utf-8"))
        written += 1
        if stop_after is not None and written >= stop_after:
            return manifest
    if not manifest["rows"]:
        raise DataError(f"{spec}: holds no rows (only blank lines)")
    manifest["done"] = True
    write_atomic(folder / MANIFEST, lambda p: p.write_text(json.dumps(manifest), encoding="utf-8"))
    took = time.perf_counter() - start
    log(f"kotune: data: {spec}: streamed {manifest['rows']} rows into {len(manifest['shards'])} shards in {took:.1f}s")
    return manifest


def write_shard(folder: Path, number: int, encoded: Encoded, first_row: int) -> None:
    """Append the chunk's tokens (flushed to disk), then write its index: a shard exists once its index does."""
    table = encoded.examples
    for name, values in ((IDS, table.ids), (LABELS, table.labels)):
        with (folder / name).open("ab") as f:
            f.write(np.ascontiguousarray(values, dtype=np.int32).tobytes())
            f.flush()
            os.fsync(f.fileno())
    index = {
        "rows": np.asarray(table.rows, dtype=np.int64) + first_row,
        "lengths": np.asarray(table.ends - table.starts, dtype=np.int32),
        "length": encoded.length.astype(np.int32),
        "truncated": encoded.truncated,
        "eos_lost": encoded.eos_lost,
        "skip": encoded.skip,
    }

    def save(path: Path) -> None:
        with path.open("wb") as f:
            np.savez(f, **index)

    write_atomic(folder / f"shard-{number:05d}.npz", save)


def load_shards(folder: Path) -> Encoded:
    """The finished entry as one ``Encoded``: token arrays memory-mapped, per-row arrays joined from the shards."""
    manifest = read_manifest(folder)
    reasons = sorted({r for s in manifest["shards"] for r in s["reasons"]})
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("rows", "lengths", "length", "truncated", "eos_lost", "skip")}
    for number, shard in enumerate(manifest["shards"]):
        with np.load(folder / f"shard-{number:05d}.npz", allow_pickle=False) as index:
            for key in parts:
                parts[key].append(index[key])
        remap = np.asarray([reasons.index(r) for r in shard["reasons"]] + [-1], dtype=np.int16)
        parts["skip"][-1] = remap[parts["skip"][-1]]  # -1 (kept) indexes the appended -1
    joined = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    ids, labels = (np.memmap(folder / n, dtype=np.int32, mode="r") if manifest["tokens"] else np.zeros(0, np.int32)
                   for n in (IDS, LABELS))  # fmt: skip
    table = ExampleTable.from_arrays(joined["rows"], joined["lengths"].astype(np.int64), ids, labels)
    return Encoded(table, joined["length"], joined["truncated"], joined["eos_lost"], joined["skip"], reasons)


def stream_audit(spec: str, manifest: dict[str, Any], encoded: Encoded, cutoff_len: int) -> AuditReport:
    """The audit a streamed source gets: counts and token lengths, and a note of what was not checked."""
    kept = encoded.length[encoded.skip == -1]
    q = np.percentile(kept, [50, 95]).astype(int).tolist() if len(kept) else [0, 0]
    lengths = {"min": int(kept.min()) if len(kept) else 0, "median": q[0], "p95": q[1], "max": int(kept.max(initial=0))}
    return AuditReport(
        source=spec,
        format=manifest["format"],
        rows=manifest["rows"],
        kept=len(encoded.examples),
        cutoff_len=cutoff_len,
        lengths=lengths,
        histogram=[],
        tokens=manifest["tokens"],
        trained_tokens=manifest["trained"],
        special_ids=[],
        findings=[Finding("streamed", INFO, STREAM_NOTE, [])],
    )
