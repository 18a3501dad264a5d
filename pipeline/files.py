"""Files every stage writes: one atomic-write helper and one chunked sha256.

Every artifact (Parquet shards, manifests, audio, checkpoints, reports) is written through `atomic_write`: into a
temporary file beside the target, named `.<name>.<random>.tmp`, flushed and fsynced, then renamed over the target
(rename is atomic on POSIX). A reader sees the old file or the whole new one, never a part; a writer killed at any
moment leaves at most a temp file, which `remove_stale_temp_files` (run by every resumable writer on start) deletes.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_GLOB = ".*.tmp"  # every temp file this module makes matches it (and nothing a stage keeps does)


def temp_path(path: Path | str) -> Path:
    """A fresh temp name beside `path`: `.<name>.<random>.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def fsync_file(path: Path | str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_write(path: Path | str) -> Iterator[Path]:
    """Yield a temp path to write `path`'s new content to; on success it is fsynced and renamed over `path`, on
    any error it is removed (the old file, if any, stays as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path | str, value, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=True))


def remove_stale_temp_files(directory: Path | str) -> int:
    """Delete the temp files a killed writer left in `directory`; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    stale = list(directory.glob(TEMP_GLOB))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def sha256_file(path: Path | str, chunk: int = 1 << 24) -> str:
    """The sha256 of a file's bytes, read in chunks of `chunk` bytes (memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
