"""Files every stage writes: one atomic-write helper and one chunked sha256.

Every artifact (Parquet shards, manifests, audio, checkpoints, reports) is written through `atomic_write`: into a
temporary file beside the target, named `.<name>.<random>.tmp`, flushed and fsynced, then renamed over the target
(rename is atomic on POSIX). A reader sees the old file or the whole new one, never a part; a writer killed at any
moment leaves at most a temp file, which `remove_stale_temp_files` (run by every resumable writer on start) deletes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import CannotWrite

TEMP_GLOB = ".*.tmp"  # every temp file this module makes matches it (and nothing a stage keeps does)
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied"}  # fmt: skip
NEARLY_FULL = 1 << 20  # bytes: a write that failed with less free space than this failed for want of space


def _errno_of(exc: BaseException) -> int | None:
    """The errno of an exception or of one it was raised from (libraries wrap OSError in their own errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(getattr(exc, "errno", None), int):
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(path: Path | str, exc: BaseException, nbytes: int | None = None) -> CannotWrite | None:
    """The one-line error for a failed write of `path` when the machine, not the code, stopped it: a full disk, a
    quota, a read-only filesystem, no permission (by errno; a library that hides the errno: by the free space left).
    None for anything else (a bug keeps its traceback)."""
    if isinstance(exc, CannotWrite):
        return exc
    code = _errno_of(exc)
    reason = WRITE_ERRNOS.get(code)
    if reason is None:
        try:
            st = os.statvfs(Path(path).parent if not Path(path).is_dir() else path)
            if st.f_bavail * st.f_frsize < NEARLY_FULL:
                reason = "no space left on the device"
        except OSError:
            pass
    if reason is None:
        return None
    size = f" ({nbytes} bytes written of it)" if nbytes else ""
    return CannotWrite(f"cannot write {path}: {reason}{size}; what was written before it is intact (no partial file "
                       f"is left): free space (or fix the permissions) and run the same command again, it resumes "
                       f"where it stopped")  # fmt: skip


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
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as exc:  # a full disk (or a read-only one) is one line naming the file, not a traceback
        problem = write_error(path, exc, tmp.stat().st_size if tmp.exists() else None)
        if problem is None:
            raise
        raise problem from None
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


MANIFEST = "MANIFEST.json"


def write_directory_manifest(directory: Path | str) -> Path:
    """MANIFEST.json of a directory written as a unit (a checkpoint, a saved model): every file below it (but the
    manifest) with its bytes and sha256, written last, atomically. Files are fsynced first."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {}
    for p in files:
        fsync_file(p)
        entries[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return write_json_atomic(directory / MANIFEST, entries)


def verify_file(path: Path, entry: dict, recorder: str, fix: str) -> None:
    """A file against what a manifest recorded of it (`entry`: bytes and sha256; `recorder`: which manifest, as the
    message names it): CorruptData naming the file when its size or sha256 differs, and `fix`."""
    from pipeline.errors import CorruptData

    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CorruptData(f"{path}: {size} bytes, {recorder} recorded {entry['bytes']} (truncated or overwritten); "
                          f"{fix}")  # fmt: skip
    if sha256_file(path) != entry["sha256"]:
        raise CorruptData(f"{path}: its sha256 differs from the one {recorder} recorded (the file changed on disk); "
                          f"{fix}")  # fmt: skip


def verify_directory(directory: Path | str, what: str, fix: str) -> None:
    """Every file MANIFEST.json lists is there with its bytes and sha256; CorruptData naming the first that is missing,
    truncated or changed, `what` the directory is and `fix` what to do. A directory without a manifest is refused."""
    from pipeline.errors import CorruptData

    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptData(f"{directory / MANIFEST}: not readable ({type(exc).__name__}): {what} is incomplete or was "
                          f"not written by speechkd; {fix}") from None  # fmt: skip
    for name, entry in manifest.items():
        path = directory / name
        if not path.exists():
            raise CorruptData(f"{path}: listed in the {MANIFEST} of {what} but missing; {fix}")
        verify_file(path, entry, f"the {MANIFEST} of {what}", fix)
