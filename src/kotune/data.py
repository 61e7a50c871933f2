"""Reading rows: local json / jsonl / csv / parquet files or folders, or a hub dataset; column mapping; split.

Rows are plain dicts. Every row carries ``_row``: its position in the source, so errors and reports
can name it. Problems a user can fix raise ``DataError`` naming the file and line, row or column.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kotune.config import DataConfig

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ALPACA_COLUMNS = ("instruction", "input", "output")


class DataError(ValueError):
    """A data problem a user can fix; the message names the file and the line, row or column."""


@dataclass
class Split:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "Korean files saved on Windows are often cp949 (euc-kr): convert with "
            f"`iconv -f cp949 -t utf-8 {path.name} > fixed.{path.suffix.lstrip('.')}`"
        ) from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, expected an object")
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line under a .json name
            return _read_jsonl(path)
        raise DataError(f"{path}: line {exc.lineno} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows, or an object holding exactly one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, got a JSON {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is a JSON {type(row).__name__}, expected an object")
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    return [dict(r) for r in csv.DictReader(_decode(path).splitlines(keepends=True))]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as parquet ({exc})") from None


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def local_files(path: str | Path) -> list[Path]:
    """The data files a local path stands for (a file, or the supported files of a folder, sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: folder holds no {' / '.join(LOCAL_SUFFIXES)} files")
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(LOCAL_SUFFIXES)}")
    return [path]


def is_local(spec: str) -> bool:
    return Path(spec).exists() or Path(spec).suffix in LOCAL_SUFFIXES


def read_rows(spec: str, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a local file / folder or a hub dataset, each tagged with ``_row`` and ``_source``."""
    if is_local(spec):
        if not Path(spec).exists():
            raise DataError(f"{spec}: file not found")
        rows: list[dict[str, Any]] = []
        for file in local_files(spec):
            if file.stat().st_size == 0:
                raise DataError(f"{file}: file is empty")
            file_rows = READERS[file.suffix](file)
            if not file_rows:
                raise DataError(f"{file}: file holds no rows")
            for i, row in enumerate(file_rows):
                row["_source"] = f"{file}:{i}"
            rows.extend(file_rows)
    else:
        rows = _read_hub(spec, split)
    for i, row in enumerate(rows):
        row["_row"] = i
    return rows


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"'{name}' is not a local file; reading hub datasets needs `pip install datasets`") from None
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for an unreachable or unknown dataset
        raise DataError(f"'{name}': cannot load from the hub ({type(exc).__name__}: {exc})") from None
    rows = table.to_list()
    for i, row in enumerate(rows):
        row["_source"] = f"{name}[{split}]:{i}"
    return rows


def apply_columns(rows: list[dict[str, Any]], mapping: dict[str, str], where: str) -> list[dict[str, Any]]:
    """Rename the user's columns to kotune's (``mapping`` is kotune name -> user column)."""
    if not mapping:
        return rows
    present = set().union(*(r.keys() for r in rows[:1000])) if rows else set()
    for ours, theirs in mapping.items():
        if theirs not in present:
            columns = ", ".join(sorted(c for c in present if not c.startswith("_")))
            raise DataError(
                f"{where}: data.columns maps '{ours}' to column '{theirs}', which is absent; columns present: {columns}"
            )
    renamed = []
    for row in rows:
        row = dict(row)
        for ours, theirs in mapping.items():
            row[ours] = row.pop(theirs, None)
        renamed.append(row)
    return renamed


def split_rows(rows: list[dict[str, Any]], val_size: float, seed: int) -> Split:
    """Seeded train / validation split: the same rows go to validation on every run with the same seed."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = round(len(rows) * val_size) if val_size > 0 else 0
    if val_size > 0 and len(rows) > 1:
        n_val = max(1, n_val)
    val_ids = set(order[:n_val])
    return Split(
        train=[rows[i] for i in order if i not in val_ids],
        validation=[rows[i] for i in order[:n_val]],
    )


def load_split(cfg: DataConfig) -> Split:
    """Rows for training and validation, as the config says."""
    rows = apply_columns(read_rows(cfg.path, cfg.split), cfg.columns, cfg.path)
    if cfg.validation_path:
        val = apply_columns(read_rows(cfg.validation_path, "validation"), cfg.columns, cfg.validation_path)
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        split = Split(train=[rows[i] for i in order], validation=val)
    else:
        split = split_rows(rows, cfg.val_size, cfg.seed)
    if cfg.max_rows is not None:
        split.train = split.train[: cfg.max_rows]
    return split
