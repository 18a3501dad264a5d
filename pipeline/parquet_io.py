"""Atomic Parquet writes and sharded-artifact helpers shared by every stage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.files import atomic_write, remove_stale_temp_files  # noqa: F401 - re-exported for the stages

COMPRESSION = "zstd"
COMPRESSION_LEVEL = 6


def write_table_atomic(table: pa.Table, path: Path | str, **kwargs) -> Path:
    """Write `table` to `path` so that readers see either nothing or the whole file (pipeline.files.atomic_write:
    a temp file beside it, fsynced, renamed over it), zstd-compressed unless told otherwise."""
    kwargs.setdefault("compression", COMPRESSION)
    kwargs.setdefault("compression_level", COMPRESSION_LEVEL)
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, **kwargs)
    return Path(path)


def shard_paths(directory: Path | str, prefix: str = "part-") -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{prefix}*.parquet"))


def next_shard_path(directory: Path | str, prefix: str = "part-") -> Path:
    existing = shard_paths(directory, prefix)
    index = 0
    if existing:
        index = max(int(p.stem[len(prefix) :].split("-")[0]) for p in existing) + 1
    return Path(directory) / f"{prefix}{index:05d}.parquet"


class RowGroupReader:
    """Row groups of a list of Parquet files, read through per-process handles (a DataLoader worker that
    forks opens its own), the `keep` most recently read ones kept in memory."""

    def __init__(self, paths: Iterable[Path | str], keep: int = 0):
        self.paths, self.keep = list(paths), keep
        self._pid = None

    def _this_process(self) -> None:
        if self._pid != os.getpid():
            self._files, self._kept, self._pid = {}, {}, os.getpid()

    def file(self, i: int) -> pq.ParquetFile:
        self._this_process()
        if i not in self._files:
            self._files[i] = pq.ParquetFile(self.paths[i])
        return self._files[i]

    def read(self, i: int, group: int, columns: list[str] | None = None, keep: bool = True) -> pa.Table:
        """Row group `group` of file `i` (those columns); kept for the next call unless keep=False."""
        self._this_process()
        key = (i, group, tuple(columns) if columns else None)
        table = self._kept.pop(key, None)
        if table is None:
            table = self.file(i).read_row_group(group, columns=columns)
        if keep and self.keep:
            self._kept[key] = table  # most recently used last
            while len(self._kept) > self.keep:
                self._kept.pop(next(iter(self._kept)))
        return table


def rejects_table(rows: Iterable[dict]) -> pa.Table:
    rows = list(rows)
    cols = {f.name: [r.get(f.name) for r in rows] for f in schemas.REJECTS_SCHEMA}
    schema = schemas.with_metadata(schemas.REJECTS_SCHEMA, "rejects", schemas.REJECTS_VERSION)
    return pa.table(cols, schema=schema)


def rejects_path(stage_out_dir: Path | str, stage: str, suffix: str = "") -> Path:
    """Where a stage records its rejects: <data>/rejects/<stage>.parquet (<stage>-<dir>.parquet when the
    stage writes somewhere other than its usual directory; `suffix` names a part of a stage's output, e.g. one
    cache partition's).

    One folder for every stage's rejects (a sibling of the stage's output
    directory), so no stage's own glob such as features/*.parquet picks them up
    and one DuckDB glob reads them all.
    """
    out = Path(stage_out_dir)
    name = stage if out.name in STAGE_DIRS.get(stage, ()) else f"{stage}-{out.name}"
    return out.parent / "rejects" / f"{name}{suffix}.parquet"


# A stage writing to its usual directory records rejects as <stage>.parquet; to another directory (a second
# speech set, such as the flow's held-out voice) as <stage>-<directory>.parquet, so no run overwrites another's.
STAGE_DIRS = {"samples": ("samples",), "speech": ("audio",), "features": ("features",), "cache": ("cache",)}


def reject(stage: str, field: str, reason: str, *, sample_id=None, rendition=None, source_position=None) -> dict:
    return {
        "stage": stage,
        "sample_id": sample_id,
        "rendition": rendition,
        "source_position": source_position,
        "field": field,
        "reason": reason,
    }
