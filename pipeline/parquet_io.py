"""Atomic Parquet writes and sharded-artifact helpers shared by every stage."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas

COMPRESSION = "zstd"
COMPRESSION_LEVEL = 6


def write_table_atomic(table: pa.Table, path: Path | str, **kwargs) -> Path:
    """Write `table` to `path` so that readers see either nothing or the whole file.

    The file is written under a temporary name in the same directory, fsynced,
    then renamed over `path` (rename is atomic on POSIX), so a process killed at
    any moment never leaves a truncated Parquet file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(
            table,
            tmp,
            compression=kwargs.pop("compression", COMPRESSION),
            compression_level=kwargs.pop("compression_level", COMPRESSION_LEVEL),
            **kwargs,
        )
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_stale_temp_files(directory: Path | str) -> int:
    """Delete temp files left by a killed writer; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    stale = list(directory.glob(".*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


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


def rejects_table(rows: Iterable[dict]) -> pa.Table:
    rows = list(rows)
    cols = {f.name: [r.get(f.name) for r in rows] for f in schemas.REJECTS_SCHEMA}
    schema = schemas.with_metadata(schemas.REJECTS_SCHEMA, "rejects", schemas.REJECTS_VERSION)
    return pa.table(cols, schema=schema)


def rejects_path(stage_out_dir: Path | str, stage: str) -> Path:
    """Where a stage records its rejects: <data>/rejects/<stage>.parquet.

    One folder for every stage's rejects (a sibling of the stage's output
    directory), so no stage's own glob such as features/*.parquet picks them up
    and one DuckDB glob reads them all.
    """
    return Path(stage_out_dir).parent / "rejects" / f"{stage}.parquet"


def reject(stage: str, field: str, reason: str, *, sample_id=None, rendition=None, source_position=None) -> dict:
    return {
        "stage": stage,
        "sample_id": sample_id,
        "rendition": rendition,
        "source_position": source_position,
        "field": field,
        "reason": reason,
    }
