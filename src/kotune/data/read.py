"""Reading rows: local json / jsonl / csv / parquet files or folders, or a hub dataset; column mapping; split.

Rows are plain dicts. Every row carries ``_row`` (its position in the source, counted from 0, so reports can
name it) and ``_source`` (where it is: ``FILE line N`` for jsonl / csv, ``FILE row N`` otherwise). Problems a
user can fix raise ``DataError`` naming the file and the line, row or column.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any

from kotune.errors import KotuneError
from kotune.paths import looks_local

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(KotuneError, ValueError):
    """A data problem a user can fix; the message names the file and the line, row or column."""

    refusal = True


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}: line {line}, column {column} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); Korean files saved on Windows are often cp949 (euc-kr): convert with "
            f"`iconv -f cp949 -t utf-8 {path.name} > fixed.{path.suffix.lstrip('.')}`"
        ) from None


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text, split on ``\n`` only (a ``\r`` before it dropped). ``str.splitlines`` also
    splits on U+2028, U+2029, U+0085 and other separators that a JSON string may hold unescaped (scraped web text
    does), cutting such a row in two."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(jsonl_lines(_decode(path)), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, expected an object")
        row["_source"] = f"{path} line {number}"
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
        row["_source"] = f"{path} row {i}"
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(_decode(path), newline=""))  # csv's own line ends: not U+2028 in a field
    rows: list[dict[str, Any]] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows
        line = reader.line_num + 1
        for fields in reader:
            if fields:
                if len(fields) != len(header):
                    raise DataError(
                        f"{path}: line {line} has {len(fields)} fields, the header has {len(header)} "
                        f"({', '.join(header)}); quote fields that hold commas"
                    )
                rows.append({**dict(zip(header, fields, strict=True)), "_source": f"{path} line {line}"})
            line = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num} is not valid CSV ({exc})") from None
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as parquet ({exc})") from None
    for i, row in enumerate(rows):
        row["_source"] = f"{path} row {i}"
    return rows


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
    """A local file or folder (existing or not: a misspelled local path must not be sent to the hub)."""
    return Path(spec).exists() or Path(spec).suffix in LOCAL_SUFFIXES or looks_local(spec)


def read_rows(spec: str, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a local file / folder or a hub dataset, each tagged with ``_row`` and ``_source``."""
    if is_local(spec):
        if not Path(spec).exists():
            raise DataError(f"{spec}: file not found")
        rows: list[dict[str, Any]] = []
        for file in local_files(spec):
            if file.stat().st_size == 0:
                raise DataError(f"{file}: file is empty (0 bytes); expected {file.suffix.lstrip('.')} rows")
            file_rows = READERS[file.suffix](file)
            if not file_rows:
                raise DataError(f"{file}: file holds no rows (only blank lines or a header)")
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
        row["_source"] = f"{name}[{split}] row {i}"
    return rows


def columns_present(rows: list[dict[str, Any]]) -> list[str]:
    """The user-visible columns of any row, sorted (kotune's ``_row`` / ``_source`` left out)."""
    present: set[str] = set()
    for row in rows:
        present.update(row.keys())
    return sorted(c for c in present if not c.startswith("_"))


def apply_columns(rows: list[dict[str, Any]], mapping: dict[str, str], where: str) -> list[dict[str, Any]]:
    """Rename the user's columns to kotune's (``mapping`` is kotune name -> user column)."""
    if not mapping:
        return rows
    present = columns_present(rows)
    for ours, theirs in mapping.items():
        if theirs not in present:
            raise DataError(
                f"{where}: data.columns maps '{ours}' to column '{theirs}', which is absent; "
                f"columns present: {', '.join(present)}"
            )
    theirs = set(mapping.values())
    renamed = []
    for row in rows:
        picked = {ours: row.get(column) for ours, column in mapping.items()}  # all read first: swaps work
        renamed.append({**{k: v for k, v in row.items() if k not in theirs}, **picked})
    return renamed


def _kind_of_type(kind: type) -> str:
    """The JSON kind of values of a Python type, as a user would name it."""
    if kind is bool:
        return "boolean"
    for python, name in ((int, "number"), (float, "number"), (str, "text"), (list, "list"), (dict, "object")):
        if issubclass(kind, python):
            return name
    return kind.__name__


def check_types(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Each column holds one kind of value (nulls aside); the first row that breaks this is named."""
    for column in columns:
        types = {type(row.get(column)) for row in rows} - {type(None)}
        if len({_kind_of_type(t) for t in types}) <= 1:  # the common case, without a pass per value
            continue
        first_kind, first_row = None, None
        for row in rows:
            value = row.get(column)
            if value is None:
                continue
            kind = _kind_of_type(type(value))
            if first_kind is None:
                first_kind, first_row = kind, row
            elif kind != first_kind:
                raise DataError(
                    f"{row['_source']}: column '{column}' holds {kind} ({str(value)[:40]!r}), but it holds "
                    f"{first_kind} in earlier rows (first at {first_row['_source']}); make the column one type"
                )


def split_indices(n_rows: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train / validation split of ``range(n_rows)``: (train in shuffled order, validation)."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    n_val = round(n_rows * val_size) if val_size > 0 else 0
    if val_size > 0 and n_rows > 1:
        n_val = max(1, n_val)
    val_ids = set(order[:n_val])
    return [i for i in order if i not in val_ids], order[:n_val]
