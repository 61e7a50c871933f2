"""One entry of ``data.sources``: a data source of a mixture, with its own reading settings and its share.

Kept apart from ``config.py`` (whose ``DataConfig`` lists them) so a source's settings read in one place. Unset
reading settings (``format``, ``template``, ``columns``, ``val_size``) take ``data``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from kotune.errors import KotuneError


class SourceConfigError(KotuneError, ValueError):
    """A source setting out of range; the message names the source and the key."""

    refusal = True


@dataclass
class SourceConfig:
    path: str = ""
    """A hub dataset name, or a local json / jsonl / csv / parquet file or folder."""
    split: str = "train"
    """Split to read from a hub dataset."""
    format: str | None = None
    """Row format (as ``data.format``); unset: ``data.format``."""
    template: str | None = None
    """Prompt template (as ``data.template``); unset: ``data.template``."""
    columns: dict[str, str] | None = None
    """Column mapping (as ``data.columns``); unset: ``data.columns``."""
    weight: float | None = None
    """Sampling share: the sources with a weight fill as many rows as they hold together, each its share of them
    (a small source with a large weight repeats rows, a large one with a small weight gives a seeded subset)."""
    epochs: float | None = None
    """Instead of a weight: passes over this source's rows (1.5: every row once, half of them twice). Neither set:
    1, every row once."""
    max_rows: int | None = None
    """Use only the first N of this source's training rows (after the held-out split, before the weighting)."""
    val_size: float | None = None
    """Share of this source's rows held out for validation; unset: ``data.val_size`` (0 when
    ``data.validation_path`` is set)."""
    name: str = ""
    """How the audit, the preview and the logs name this source; unset: its path."""

    def label(self) -> str:
        return self.name or self.path


def validate_sources(sources: list[SourceConfig]) -> None:
    """Each source has a path, a positive weight or epochs (not both), a sane held-out share; names are unique."""
    labels: set[str] = set()
    for i, s in enumerate(sources):
        where = f"data.sources[{i}] ({s.label() or 'no path'})"
        if not s.path:
            raise SourceConfigError(f"{where}: 'path' is missing")
        if s.weight is not None and s.epochs is not None:
            raise SourceConfigError(f"{where}: set 'weight' or 'epochs', not both")
        if s.weight is not None and not s.weight > 0:
            raise SourceConfigError(f"{where}: 'weight' must be positive, got {s.weight}")
        if s.epochs is not None and not s.epochs > 0:
            raise SourceConfigError(f"{where}: 'epochs' must be positive, got {s.epochs}")
        if s.max_rows is not None and s.max_rows <= 0:
            raise SourceConfigError(f"{where}: 'max_rows' must be positive, got {s.max_rows}")
        if s.val_size is not None and not 0 <= s.val_size < 1:
            raise SourceConfigError(f"{where}: 'val_size' must be in [0, 1), got {s.val_size}")
        if s.label() in labels:
            raise SourceConfigError(f"{where}: two sources are named {s.label()!r}; give one a 'name'")
        labels.add(s.label())
