"""A cache directory's layout: manifests, partitions, locks, and the checks every shard passes.

Layout of a cache directory (one partition, the default):

    manifest.json        fingerprint (teacher weights/tokenizer/template hashes, k,
                         encoding), and per shard: rows, bytes, sha256
    part-00000.parquet   rows (schema: pipeline.schemas.cache_schema(targets))
    .lock                held by the one process writing

With P > 1 partitions (`--partitions P`, fixed for the cache's life) a sample
belongs to partition sha256(sample_id) mod P, and each partition is a directory
laid out as above, written by one worker at a time under its own lock:

    manifest.json        layout "partitioned", partitions P, fingerprint, inputs (no shards)
    partition-0000/      manifest.json, part-*.parquet, .lock   (that partition's own)
    partition-0001/      ...

Readers (CacheReader, pipeline.query, the student) read the union of the
partitions' manifests, each a committed state of its partition; no process
writes a union manifest, so no two workers ever write the same file.

Exactly once: a shard is written to a temp file and renamed into place, then
the manifest (also written atomically) records it. On start a writer removes
temp files, adopts complete shards the manifest missed (killed between the two
renames), and skips every sample already stored, so a run killed at any moment
and restarted ends with exactly one row per sample."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.errors import CorruptData, InputMismatch, UserError
from pipeline.files import sha256_file, write_json_atomic
from pipeline.fingerprint import diff
from pipeline.parquet_io import shard_paths

MANIFEST = "manifest.json"
SHARD_PREFIX = "part-"
# Fingerprint fields that must match to append to / read a cache as this teacher's.
FINGERPRINT_KEYS = [
    "weights_sha256",
    "tokenizer_sha256",
    "chat_template_sha256",
    "top_k",
    "targets",
    "draws",
    "draw_temperature",
    "draw_seed",
    "encoding_version",
    "logprob_step",
    "id_bits",
    "responses",
    "turns",
    "dtype",
    "max_model_len",
    "too_long",
    "generation",
    "vllm",
]

# --- manifest ----------------------------------------------------------------


def current_fingerprint(fingerprint: dict, schema_version) -> dict:
    """A fingerprint as this version records it: one written by cache version 3 (or a shard of one) scored the
    last turn (`turns` was added in 4), and its teacher-written responses were generated, then re-scored (`teacher`
    meant `teacher-rescored` until one-pass generation came in 4)."""
    if schema_version is None or int(schema_version) >= 4:
        return fingerprint
    fp = {**fingerprint, "turns": fingerprint.get("turns", "last")}
    if fp.get("responses") == "teacher":
        fp["responses"] = "teacher-rescored"
    return fp



def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    write_json_atomic(Path(cache_dir) / MANIFEST, manifest)


class FingerprintMismatch(InputMismatch):
    pass


# --- partitions ------------------------------------------------------------------

PARTITIONED = "partitioned"
PARTITION_PREFIX = "partition-"


def partition_of(sample_id: str, partitions: int) -> int:
    """A sample's partition: stable across runs, machines and Python versions (not Python's salted hash)."""
    if partitions == 1:
        return 0
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") % partitions


def partition_dir(cache_dir: Path | str, index: int, partitions: int) -> Path:
    """Where partition `index` is written: the cache directory itself when there is one partition."""
    return Path(cache_dir) if partitions == 1 else Path(cache_dir) / f"{PARTITION_PREFIX}{index:04d}"


def cache_partitions(cache_dir: Path | str, manifest: dict | None = None) -> int:
    """The cache's partition count (1 for a cache without the field: every cache before partitions)."""
    manifest = read_manifest(cache_dir) if manifest is None else manifest
    return int((manifest or {}).get("partitions", 1))


def replaces_other_setup(cache_dir: Path, fingerprint: dict, recorded: dict, overwrite: bool,
                         keys: list[str] = FINGERPRINT_KEYS) -> bool:  # fmt: skip
    """Whether the cache's recorded fingerprint differs from this run's `fingerprint` in `keys` (then, with
    `overwrite`, the caller empties it); without `overwrite` a difference is refused, every differing field listed."""
    problems = diff(fingerprint, recorded, keys)
    if problems and not overwrite:
        raise FingerprintMismatch(f"the cache at {cache_dir} was made by a different teacher setup:\n  "
                                  + "\n  ".join(problems)
                                  + "\nuse another output directory, or pass --overwrite to replace this cache")
    return bool(problems)


class Locks:
    """Exclusive, non-blocking flocks on the `.lock` of these directories, released on exit."""

    def __init__(self, dirs: list[Path], what: str):
        self.dirs, self.what, self.handles = dirs, what, []

    def __enter__(self) -> "Locks":
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
            fh = open(d / ".lock", "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip()
                fh.close()
                self.__exit__()
                raise UserError(f"another process{f' ({holder})' if holder else ''} is writing {d}; "
                                f"{self.what}: wait for it or stop it") from None  # fmt: skip
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
            fh.flush()
            self.handles.append(fh)
        return self

    def __exit__(self, *exc) -> None:
        for fh in self.handles:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        self.handles = []


def wipe(cache_dir: Path) -> None:
    """Remove a cache's rows and manifests (both layouts), keep the directory and its lock."""
    for p in shard_paths(cache_dir, SHARD_PREFIX):
        p.unlink()
    for d in sorted(cache_dir.glob(f"{PARTITION_PREFIX}*")):
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
    (cache_dir / MANIFEST).unlink(missing_ok=True)


def open_cache_layout(cache_dir: Path | str, fingerprint: dict, partitions: int | None, overwrite: bool = False,
                      inputs: dict | None = None) -> int:  # fmt: skip
    """Create or check a cache's layout before any worker writes to it; returns its partition count.

    `fingerprint`: the writers' (with the encoding). `partitions` None: the existing cache's, else 1. A
    different count than the cache's is refused (a sample's partition depends on it) unless `overwrite`, which
    empties the cache; so does a different fingerprint of a partitioned cache (a one-partition cache's
    CacheWriter handles its own). Run once by the coordinator, never concurrently with the cache's writers.
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    existing = None if manifest is None else cache_partitions(cache_dir, manifest)
    wanted = partitions or existing or 1
    if existing is not None and existing != wanted:
        if not overwrite:
            raise InputMismatch(
                f"the cache at {cache_dir} has {existing} partition(s), fixed for its life (a sample's partition is "
                f"sha256(sample_id) mod P): pass --partitions {existing} (or leave it out), use another --out, or "
                f"pass --overwrite to rebuild it with {wanted}"
            )
        with Locks([partition_dir(cache_dir, i, existing) for i in range(existing)], "--overwrite empties it"):
            wipe(cache_dir)
        manifest = None
    if wanted == 1:
        return 1
    if manifest is not None:
        # a manifest of another schema version is another setup too
        version = manifest.get("schema_version")
        recorded = {**current_fingerprint(manifest["fingerprint"], version),
                    "schema_version": version if version not in schemas.CACHE_READABLE_VERSIONS else "readable"}
        if replaces_other_setup(cache_dir, {**fingerprint, "schema_version": "readable"}, recorded,
                                overwrite, FINGERPRINT_KEYS + ["schema_version"]):  # fmt: skip
            with Locks([partition_dir(cache_dir, i, wanted) for i in range(wanted)], "--overwrite empties it"):
                wipe(cache_dir)
            manifest = None
    if manifest is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(cache_dir, {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "layout": PARTITIONED, "partitions": wanted,
            "fingerprint": fingerprint, "schema_version": schemas.CACHE_VERSION,
            "inputs": {key: relative_to(value, cache_dir) for key, value in (inputs or {}).items()},
            "inputs_relative_to": "manifest",
        })  # fmt: skip
    for i in range(wanted):
        partition_dir(cache_dir, i, wanted).mkdir(exist_ok=True)
    return wanted


def cache_shards(cache_dir: Path | str) -> list[tuple[Path, dict]]:
    """(shard path, its manifest entry) of every shard of a cache, both layouts, in storage order; a partition
    never written yet has none. Raises FingerprintMismatch when a partition was written by another setup."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        return []
    if manifest.get("layout") != PARTITIONED:
        return [(cache_dir / name, manifest["shards"][name]) for name in sorted(manifest["shards"])]
    out = []
    for i in range(manifest["partitions"]):
        pdir = partition_dir(cache_dir, i, manifest["partitions"])
        pm = read_manifest(pdir)
        if pm is None:
            continue
        problems = diff(manifest["fingerprint"], pm["fingerprint"], FINGERPRINT_KEYS)
        if problems:
            raise FingerprintMismatch(f"{pdir} was written by a different teacher setup than {cache_dir}/{MANIFEST} "
                                      f"says: " + "; ".join(problems) + ". Rebuild the cache (--overwrite)")  # fmt: skip
        out.extend((pdir / name, pm["shards"][name]) for name in sorted(pm["shards"]))
    return out


def relative_to(value: str | Path | None, directory: Path) -> str | None:
    """A local path as seen from `directory` (relative), anything else (a hub id, None) unchanged."""
    if value is None or not Path(value).exists():
        return None if value is None else str(value)
    return os.path.relpath(Path(value).resolve(), Path(directory).resolve())


def fix_command(cache_dir: Path) -> str:
    return (f"re-run the teacher on this cache with the options it was made with (`python -m pipeline.teacher "
            f"--out {cache_dir} ...`, or the cache-teacher flow): the samples of a shard moved away are scored "
            f"again")  # fmt: skip


def shard_fingerprint(path: Path) -> dict | None:
    """The fingerprint a shard was written with (its Parquet metadata), None when it has none."""
    meta = schemas.read_metadata(pq.read_schema(path))
    return current_fingerprint(json.loads(meta["fingerprint"]), meta.get("version")) if "fingerprint" in meta else None


def check_shard(path: Path, entry: dict | None, fingerprint: dict, verify: bool = True) -> None:
    """Refuse a shard that is unreadable, differs from its manifest checksum, or was written by another
    teacher setup than `fingerprint`: one CorruptData / FingerprintMismatch naming the shard and the fix."""
    cache_dir = path.parent.parent if path.parent.name.startswith(PARTITION_PREFIX) else path.parent
    if verify and entry is not None and sha256_file(path) != entry["sha256"]:
        raise CorruptData(f"{path}: its sha256 differs from the one {MANIFEST} recorded when it was written "
                          f"(corrupted or truncated on disk). Move it away (mv {path} {path}.corrupt), then "
                          f"{fix_command(cache_dir)}; or read without checking (--no-verify) at your own risk")  # fmt: skip
    try:
        found = shard_fingerprint(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptData(f"{path}: not a readable Parquet file ({exc}). Move it away (mv {path} "
                          f"{path}.corrupt), then {fix_command(cache_dir)}") from None  # fmt: skip
    problems = diff(fingerprint, found or {}, FINGERPRINT_KEYS)
    if problems:
        raise FingerprintMismatch(
            f"{path} was written by a different teacher setup than {cache_dir}/{MANIFEST} says: "
            + "; ".join(problems) + f". Move it away (mv {path} {path}.foreign), or rebuild the cache (--overwrite)"
        )
