"""The teacher logit cache: zstd Parquet shards, one row per sample, plus manifest.json.

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
and restarted ends with exactly one row per sample.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.errors import CorruptData, InputMismatch, MissingInput, UserError
from pipeline.fingerprint import diff
from pipeline.parquet_io import (
    COMPRESSION,
    COMPRESSION_LEVEL,
    RowGroupReader,
    next_shard_path,
    remove_stale_temp_files,
    shard_paths,
    write_table_atomic,
)

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
    "dtype",
    "max_model_len",
    "too_long",
    "generation",
    "vllm",
]
# The columns decode_row reads: always, and for the targets of each encoding.
DECODED_COLUMNS = ("sample_id", "response", "n_tokens", "token_ids", "token_logprobs")
TARGET_COLUMNS = {"topk": ("topk_ids", "topk_codes", "top1_logprobs", "tail_logmass"),
                  "sampled": ("draw_ids", "draw_counts")}  # fmt: skip
MAX_CODE_NATS = 1000.0  # logprobs further than this below the top-1 are clamped there


@dataclass(frozen=True)
class CacheEncoding:
    """Physical encoding of the targets (see schemas.cache_schema): top-k (`top_k` ids per position) or, with
    `draws`, sampled (N ids drawn per position at `draw_temperature` from uniforms seeded by `draw_seed` and each
    sample's content)."""

    top_k: int | None
    vocab_size: int
    logprob_step: float = 1 / 32  # nats; worst-case error step/2, mean ~step/4
    version: int = schemas.CACHE_VERSION
    draws: int | None = None
    draw_temperature: float | None = None
    draw_seed: int | None = None

    @property
    def targets(self) -> str:
        return "sampled" if self.draws else "topk"

    @property
    def per_position(self) -> int:
        """Ids vLLM returns per position besides the actual token: k, or N draws."""
        return self.draws if self.draws else self.top_k

    @property
    def id_bits(self) -> int:
        return max(1, int(self.vocab_size - 1).bit_length())

    @property
    def max_error(self) -> float:
        return self.logprob_step / 2

    def to_dict(self) -> dict:
        return {
            "targets": self.targets,
            "top_k": self.top_k,
            "draws": self.draws,
            "draw_temperature": self.draw_temperature,
            "draw_seed": self.draw_seed,
            "vocab_size": self.vocab_size,
            "logprob_step": self.logprob_step,
            "encoding_version": self.version,
            "id_bits": self.id_bits,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CacheEncoding":
        return cls(d["top_k"], d["vocab_size"], d["logprob_step"], d["encoding_version"], d.get("draws"),
                   d.get("draw_temperature"), d.get("draw_seed"))  # fmt: skip


# --- encode / decode ---------------------------------------------------------


def pack_ids(ids: np.ndarray, bits: int) -> bytes:
    """Pack non-negative ints at `bits` bits each, big-endian bit order."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    bitmat = ((ids.reshape(-1, 1).astype(np.int64) >> shifts) & 1).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1)).tobytes()


def unpack_ids(blob: bytes, bits: int, count: int) -> np.ndarray:
    raw = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))[: count * bits]
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64)).astype(np.int64)
    return raw.reshape(count, bits).astype(np.int64) @ weights


@dataclass
class ScoredSample:
    """Teacher output for one sample, exact (float32), before encoding. With sampled targets `topk_ids` holds the
    N draws per position (any order, repeats kept) and `topk_logprobs` their logprobs (not stored)."""

    sample_id: str
    response: str
    token_ids: np.ndarray  # (n,) int
    token_logprobs: np.ndarray  # (n,) float
    topk_ids: np.ndarray  # (n, k) int, rank order
    topk_logprobs: np.ndarray  # (n, k) float, non-increasing along k
    content_sha256: str = ""  # what was scored (pipeline.fingerprint.content_sha256)


def _common_columns(s: ScoredSample) -> dict:
    return {
        "sample_id": s.sample_id,
        "content_sha256": s.content_sha256,
        "response": s.response,
        "n_tokens": len(s.token_ids),
        "token_ids": s.token_ids.astype(np.int32),
        "token_logprobs": s.token_logprobs.astype(np.float32),
    }


def encode(s: ScoredSample, enc: CacheEncoding) -> dict:
    """One cache row of the encoding's targets (schemas.cache_schema(enc.targets))."""
    return encode_sampled(s, enc) if enc.draws else encode_topk(s, enc)


def encode_sampled(s: ScoredSample, enc: CacheEncoding) -> dict:
    n, N = s.topk_ids.shape
    if N != enc.draws:
        raise ValueError(f"sample {s.sample_id}: got {N} draws per position from the teacher, the cache holds "
                         f"{enc.draws}")  # fmt: skip
    ids = np.sort(np.asarray(s.topk_ids, dtype=np.int64), axis=1)
    first = np.ones(ids.shape, dtype=bool)  # the first of each run of equal ids (runs never cross positions)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = np.flatnonzero(first.reshape(-1))
    counts = np.diff(np.append(starts, n * N))
    return {**_common_columns(s), "draw_ids": pack_ids(ids.reshape(-1)[starts], enc.id_bits),
            "draw_counts": counts.astype(np.uint8)}  # fmt: skip


def decode_sampled(draw_ids: bytes, draw_counts: np.ndarray, n: int, enc: CacheEncoding) -> tuple[np.ndarray, ...]:
    """(ids (n, m) int64, counts (n, m) int64) of one row: each position's distinct drawn ids, ascending, and their
    counts (summing to N); m = the most distinct ids at a position, padding slots id 0 and count 0."""
    counts = np.asarray(draw_counts, dtype=np.int64)
    uniq = unpack_ids(draw_ids, enc.id_bits, len(counts))
    position = (np.cumsum(counts) - counts) // enc.draws
    slot = np.arange(len(counts)) - np.searchsorted(position, position)
    m = int(slot.max()) + 1 if len(counts) else 0
    ids, cnt = np.zeros((n, m), dtype=np.int64), np.zeros((n, m), dtype=np.int64)
    ids[position, slot], cnt[position, slot] = uniq, counts
    return ids, cnt


def encode_topk(s: ScoredSample, enc: CacheEncoding) -> dict:
    n, k = s.topk_ids.shape
    if k != enc.top_k:
        raise ValueError(f"sample {s.sample_id}: got top-{k} from the teacher, the cache is top-{enc.top_k}")
    lp = s.topk_logprobs.astype(np.float64)
    top1 = lp[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.exp(lp)
        mass = p.sum(axis=1)
        tail = np.log(np.clip(1.0 - mass, 0.0, None))
        pn = p / mass[:, None]
        entropy = -np.where(pn > 0, pn * np.log(pn), 0.0).sum(axis=1)
    below = np.clip(top1[:, None] - lp, 0.0, MAX_CODE_NATS)
    q = np.maximum.accumulate(np.rint(below / enc.logprob_step).astype(np.int64), axis=1)
    diffs = np.diff(q, axis=1, prepend=0)
    # A rank-to-rank gap over 65535 steps (> 2000 nats at 1/32) cannot happen below MAX_CODE_NATS.
    return {
        **_common_columns(s),
        "top1_ids": s.topk_ids[:, 0].astype(np.int32),
        "top1_logprobs": top1.astype(np.float32),
        "entropy": entropy.astype(np.float16),
        "tail_logmass": tail.astype(np.float16),
        "topk_ids": pack_ids(s.topk_ids, enc.id_bits),
        "topk_codes": diffs.reshape(-1).astype(np.uint16),
    }


def decode_topk(
    topk_ids: bytes, topk_codes: np.ndarray, top1_logprobs: np.ndarray, n: int, enc: CacheEncoding
) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n, k) int64, logprobs (n, k) float32) of one row, rank order."""
    k = enc.top_k
    ids = unpack_ids(topk_ids, enc.id_bits, n * k).reshape(n, k)
    q = np.cumsum(np.asarray(topk_codes, dtype=np.int64).reshape(n, k), axis=1)
    logprobs = np.asarray(top1_logprobs, dtype=np.float64)[:, None] - q * enc.logprob_step
    return ids, logprobs.astype(np.float32)


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Encoded rows -> Arrow table, list columns built from concatenated numpy arrays."""
    columns = []
    for f in schema:
        values = [r[f.name] for r in rows]
        if pa.types.is_list(f.type):
            lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat = np.concatenate(values) if values else np.array([])
            flat = pa.array(flat.astype(f.type.value_type.to_pandas_dtype()), type=f.type.value_type)
            columns.append(pa.ListArray.from_arrays(pa.array(offsets), flat, type=f.type))
        else:
            columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


# --- manifest ----------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _write_manifest(cache_dir: Path, manifest: dict) -> None:
    path = Path(cache_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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


class _Locks:
    """Exclusive, non-blocking flocks on the `.lock` of these directories, released on exit."""

    def __init__(self, dirs: list[Path], what: str):
        self.dirs, self.what, self.handles = dirs, what, []

    def __enter__(self) -> "_Locks":
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


def _wipe(cache_dir: Path) -> None:
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
        with _Locks([partition_dir(cache_dir, i, existing) for i in range(existing)], "--overwrite empties it"):
            _wipe(cache_dir)
        manifest = None
    if wanted == 1:
        return 1
    if manifest is not None:
        # a manifest of another schema version is another setup too
        recorded = {**manifest["fingerprint"], "schema_version": manifest.get("schema_version")}
        if replaces_other_setup(cache_dir, {**fingerprint, "schema_version": schemas.CACHE_VERSION}, recorded,
                                overwrite, FINGERPRINT_KEYS + ["schema_version"]):  # fmt: skip
            with _Locks([partition_dir(cache_dir, i, wanted) for i in range(wanted)], "--overwrite empties it"):
                _wipe(cache_dir)
            manifest = None
    if manifest is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_manifest(cache_dir, {
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
    return json.loads(meta["fingerprint"]) if "fingerprint" in meta else None


def check_shard(path: Path, entry: dict | None, fingerprint: dict, verify: bool = True) -> None:
    """Refuse a shard that is unreadable, differs from its manifest checksum, or was written by another
    teacher setup than `fingerprint`: one CorruptData / FingerprintMismatch naming the shard and the fix."""
    cache_dir = path.parent.parent if path.parent.name.startswith(PARTITION_PREFIX) else path.parent
    if verify and entry is not None and _sha256(path) != entry["sha256"]:
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


class CacheWriter:
    """Appends encoded rows to a cache directory in atomic shards.

    Use as a context manager; `done` maps each sample id already stored to its content hash. On open every
    shard is checked (manifest sha256, readable, written with this fingerprint); complete shards the
    manifest missed are adopted only if their own metadata carries this fingerprint.
    """

    def __init__(
        self,
        cache_dir: Path | str,
        fingerprint: dict,
        encoding: CacheEncoding,
        rows_per_shard: int = 512,
        overwrite: bool = False,
        inputs: dict | None = None,
        verify: bool = True,
        partition: tuple[int, int] = (0, 1),
    ):
        """`partition`: (index, P) of the partition this directory holds ((0, 1): the whole cache)."""
        self.inputs = inputs or {}
        self.partition = partition
        self.dir = Path(cache_dir)
        self.fingerprint = {**fingerprint, **encoding.to_dict()}
        self.encoding = encoding
        self.rows_per_shard = rows_per_shard
        self.overwrite = overwrite
        self.verify = verify
        self._rows: list[dict] = []
        self._locks = _Locks([self.dir], "one writer per cache partition")
        self.written = 0
        self.bytes_written = 0
        self.removed = 0

    def __enter__(self) -> "CacheWriter":
        self._locks.__enter__()
        remove_stale_temp_files(self.dir)
        manifest = read_manifest(self.dir)
        if manifest is not None and manifest.get("schema_version") != schemas.CACHE_VERSION:
            if not self.overwrite:
                raise InputMismatch(f"{self.dir}: cache schema version {manifest.get('schema_version')}, this "
                                    f"speechkd writes {schemas.CACHE_VERSION}; rebuild it with --overwrite")  # fmt: skip
            manifest = {"fingerprint": {}, "shards": dict.fromkeys(manifest.get("shards", {}))}
        if manifest is not None and replaces_other_setup(self.dir, self.fingerprint, manifest["fingerprint"],
                                                         self.overwrite):  # fmt: skip
                manifest = None
                for p in shard_paths(self.dir, SHARD_PREFIX):
                    p.unlink()
        if manifest is None:
            manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "shards": {}}
        self._finish_pending(manifest)
        manifest["fingerprint"] = self.fingerprint
        # where the samples, speech features and teacher are: relative to this directory (a local path) so the
        # cache can be read from any working directory, or as given (a hub id)
        manifest["inputs"] = {key: relative_to(value, self.dir) for key, value in self.inputs.items()}
        manifest["inputs_relative_to"] = "manifest"
        manifest["schema_version"] = schemas.CACHE_VERSION
        index, of = self.partition
        if of == 1:
            manifest["partitions"] = 1
        else:
            manifest["partition"] = {"index": index, "of": of}
        for name in list(manifest["shards"]):
            if not (self.dir / name).exists():
                del manifest["shards"][name]  # removed by hand: its samples will be recomputed
        for path in shard_paths(self.dir, SHARD_PREFIX):
            entry = manifest["shards"].get(path.name)
            if entry is None:  # adopt a complete shard the manifest missed (killed between shard and manifest)
                if self.overwrite and not self._same_setup(path):
                    path.unlink()
                    continue
                check_shard(path, None, self.fingerprint)
                manifest["shards"][path.name] = self._shard_entry(path)
            else:
                check_shard(path, entry, self.fingerprint, self.verify)
        self.manifest = manifest
        _write_manifest(self.dir, manifest)
        self.done: dict[str, str] = {}
        for path in shard_paths(self.dir, SHARD_PREFIX):
            t = pq.read_table(path, columns=["sample_id", "content_sha256"])
            self.done.update(zip(t["sample_id"].to_pylist(), t["content_sha256"].to_pylist()))
        return self

    def _same_setup(self, path: Path) -> bool:
        try:
            return not diff(self.fingerprint, shard_fingerprint(path) or {}, FINGERPRINT_KEYS)
        except (pa.ArrowException, OSError):
            return False

    def _shard_entry(self, path: Path) -> dict:
        return {"rows": pq.read_metadata(path).num_rows, "bytes": path.stat().st_size, "sha256": _sha256(path)}

    def _shard_schema(self) -> pa.Schema:
        fp = {k: self.fingerprint.get(k) for k in FINGERPRINT_KEYS}
        return schemas.with_metadata(schemas.cache_schema(self.encoding.targets), "cache", schemas.CACHE_VERSION,
                                     {"encoding": json.dumps(self.encoding.to_dict()),
                                      "fingerprint": json.dumps(fp, sort_keys=True)})  # fmt: skip

    # --- replacing stale rows, exactly once --------------------------------------------------------

    def _finish_pending(self, manifest: dict) -> None:
        """Complete or roll back a shard rewrite a killed run left half done (see remove())."""
        for name, new_sha in list(manifest.get("pending", {}).items()):
            path = self.dir / name
            if new_sha is None:  # the shard was to be deleted
                path.unlink(missing_ok=True)
                manifest["shards"].pop(name, None)
            elif path.exists() and _sha256(path) == new_sha:  # the rewrite landed: record it
                manifest["shards"][name] = self._shard_entry(path)
            # else the rename never happened: the old shard and its entry stand
            del manifest["pending"][name]
        manifest.pop("pending", None)

    def remove(self, sample_ids: set[str]) -> int:
        """Remove these samples' rows (to re-score them), exactly once even if killed at any point: each
        affected shard is rewritten without them to a temp file, the manifest journals the new checksum
        (`pending`), the file is renamed over the shard, then the manifest records it. A restarted writer
        finishes or rolls back a pending rewrite by comparing checksums."""
        if not sample_ids:
            return 0
        removed = 0
        for path in shard_paths(self.dir, SHARD_PREFIX):
            ids = pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist()
            drop = [i for i, sid in enumerate(ids) if sid in sample_ids]
            if not drop:
                continue
            keep = sorted(set(range(len(ids))) - set(drop))
            self.manifest.setdefault("pending", {})
            if keep:
                table = pq.read_table(path).take(keep).replace_schema_metadata(self._shard_schema().metadata)
                tmp = path.with_name(f".{path.name}.rewrite.tmp")
                pq.write_table(table, tmp, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL,
                               row_group_size=256)  # fmt: skip
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                digest = _sha256(tmp)
                self.manifest["pending"][path.name] = digest
                _write_manifest(self.dir, self.manifest)
                os.replace(tmp, path)
                self.manifest["shards"][path.name] = {"rows": len(keep), "bytes": path.stat().st_size, "sha256": digest}
            else:
                self.manifest["pending"][path.name] = None
                _write_manifest(self.dir, self.manifest)
                path.unlink()
                self.manifest["shards"].pop(path.name, None)
            del self.manifest["pending"][path.name]
            self.manifest.pop("pending")
            _write_manifest(self.dir, self.manifest)
            for i in drop:
                self.done.pop(ids[i], None)
            removed += len(drop)
        self.removed += removed
        return removed

    def add(self, row: dict) -> None:
        if row["sample_id"] in self.done:
            raise ValueError(f"sample {row['sample_id']!r} is already in the cache at {self.dir}")
        self._rows.append(row)
        self.done[row["sample_id"]] = row["content_sha256"]
        if len(self._rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        table = rows_to_table(self._rows, self._shard_schema())
        # Every shard on disk is in the manifest (adopted on open), so the next free name is the disk's.
        path = write_table_atomic(table, next_shard_path(self.dir, SHARD_PREFIX), row_group_size=256)
        entry = self._shard_entry(path)
        self.manifest["shards"][path.name] = entry
        _write_manifest(self.dir, self.manifest)
        self.written += len(self._rows)
        self.bytes_written += entry["bytes"]
        self._rows = []

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._locks.__exit__()


# --- reading -------------------------------------------------------------------


class CacheReader:
    """Reads a cache without loading it whole: by sample id, or streaming shards."""

    def __init__(self, cache_dir: Path | str, verify: bool = True, keep_row_groups: int = 16):
        """Opens the manifest and checks every shard once (sha256 against the manifest, readable, written with
        the manifest's fingerprint); `verify=False` skips the checksum (not the fingerprint check). The
        `keep_row_groups` most recently read row groups (`read_row_group`) are kept, per process."""
        self.dir = Path(cache_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise MissingInput(f"no cache at {self.dir} (no {MANIFEST}): run the cache-teacher flow first "
                               f"(`python flows/cache_teacher.py`) or point --logits at a cache")  # fmt: skip
        if manifest.get("schema_version") != schemas.CACHE_VERSION:
            raise InputMismatch(
                f"{self.dir}: cache schema version {manifest.get('schema_version')}, this speechkd reads "
                f"{schemas.CACHE_VERSION}; rebuild the cache"
            )
        self.manifest = manifest
        self.fingerprint = manifest["fingerprint"]
        self.encoding = CacheEncoding.from_dict(self.fingerprint)
        self.partitions = cache_partitions(self.dir, manifest)
        listed = cache_shards(self.dir)  # the union of the partitions' manifests
        self.shards = [path for path, _ in listed]
        self.shard_entries = {path: entry for path, entry in listed}
        for path, entry in listed:
            if not path.exists():
                raise CorruptData(f"{path} is listed in {path.parent}/{MANIFEST} but missing; "
                                  f"{fix_command(self.dir)}")  # fmt: skip
            check_shard(path, entry, self.fingerprint, verify)
        self._groups = RowGroupReader(self.shards, keep=keep_row_groups)
        self._index: dict[str, tuple[int, int]] | None = None

    @property
    def num_rows(self) -> int:
        return sum(e["rows"] for e in self.shard_entries.values())

    def sample_ids(self) -> list[str]:
        out = []
        for path in self.shards:
            out.extend(pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist())
        return out

    def _build_index(self) -> dict[str, tuple[int, int]]:
        if self._index is None:
            self._index = {}
            for s, path in enumerate(self.shards):
                for i, sid in enumerate(pq.read_table(path, columns=["sample_id"])["sample_id"].to_pylist()):
                    self._index[sid] = (s, i)
        return self._index

    def iter_rows(self, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[dict]:
        """Rows one at a time, shard by shard, a record batch in memory at a time."""
        for path in self.shards:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
                yield from batch.to_pylist()

    @property
    def targets(self) -> str:
        """The cache's target encoding: topk | sampled."""
        return self.encoding.targets

    def decode_row(self, row: dict, targets: bool = True) -> dict:
        """A stored row (Python values or numpy arrays per column) as numpy arrays, with the targets decoded
        (unless targets=False): topk_ids, topk_logprobs (n, k), tail_logmass (n,) of a top-k cache; draw_ids,
        draw_counts (n, m) of a sampled one."""
        out = {
            "sample_id": row["sample_id"],
            "response": row["response"],
            "token_ids": np.asarray(row["token_ids"], dtype=np.int64),
            "token_logprobs": np.asarray(row["token_logprobs"], dtype=np.float32),
        }
        if targets and self.encoding.draws:
            ids, counts = decode_sampled(row["draw_ids"], row["draw_counts"], row["n_tokens"], self.encoding)
            out.update(draw_ids=ids, draw_counts=counts)
        elif targets:
            ids, lps = decode_topk(row["topk_ids"], row["topk_codes"], row["top1_logprobs"], row["n_tokens"],
                                   self.encoding)  # fmt: skip
            out.update(topk_ids=ids, topk_logprobs=lps, tail_logmass=np.asarray(row["tail_logmass"], dtype=np.float32))
        return out

    def get(self, sample_ids: Iterable[str]) -> dict[str, dict]:
        """Decoded rows for the given ids (reads only the row groups holding them)."""
        index = self._build_index()
        wanted: dict[int, list[tuple[int, str]]] = {}
        for sid in sample_ids:
            if sid not in index:
                raise KeyError(f"sample {sid!r} is not in the cache at {self.dir}")
            s, i = index[sid]
            wanted.setdefault(s, []).append((i, sid))
        out = {}
        for s, items in wanted.items():
            table = pq.read_table(self.shards[s]).take([i for i, _ in items])
            for row in table.to_pylist():
                out[row["sample_id"]] = self.decode_row(row)
        return out

    def input_path(self, key: str) -> str | None:
        """An input the manifest names (samples_dir, features_dir, teacher), resolved against the cache
        directory; caches written before paths were stored relative to the manifest resolve against the
        working directory, as they were written."""
        value = self.manifest.get("inputs", {}).get(key)
        if key == "teacher" and value is None:
            value = self.fingerprint.get("model")
        if value is None:
            return None
        if self.manifest.get("inputs_relative_to") == "manifest" and not Path(value).is_absolute():
            local = Path(os.path.normpath(self.dir / value))
            return str(local) if local.exists() or key != "teacher" else value  # a hub id stays as it is
        return value

    @property
    def teacher(self) -> str:
        """The teacher's HF id or local path, usable from any working directory."""
        return self.input_path("teacher")

    def row_groups(self) -> Iterator[tuple[int, int, list[str], list[str]]]:
        """(shard index, row group index, sample ids, content hashes) over the cache, in storage order."""
        for s in range(len(self.shards)):
            for g in range(self._unreadable_as_corrupt(s, None, lambda: self._groups.file(s).num_row_groups)):
                t = self._unreadable_as_corrupt(s, g, lambda: self._groups.read(s, g, ["sample_id", "content_sha256"],
                                                                                keep=False))  # fmt: skip
                yield s, g, t["sample_id"].to_pylist(), t["content_sha256"].to_pylist()

    def _unreadable_as_corrupt(self, shard: int, group: int | None, read):
        try:
            return read()
        except (pa.ArrowException, OSError) as exc:
            where = "" if group is None else f" row group {group}"
            raise CorruptData(f"{self.shards[shard]}{where}: not readable ({exc}); {fix_command(self.dir)}") from None

    def read_row_group(self, shard: int, group: int) -> pa.Table:
        """One row group of a shard, still encoded (decode a row with decode_table_row)."""
        return self._unreadable_as_corrupt(shard, group, lambda: self._groups.read(shard, group))

    def decode_table_row(self, table: pa.Table, i: int, targets: bool = True) -> dict:
        """Row i of an encoded table, decoded like decode_row, its list columns read as numpy arrays (no
        Python object per value)."""
        row = {}
        for name in DECODED_COLUMNS + (TARGET_COLUMNS[self.targets] if targets else ()):
            value = table[name][i]
            row[name] = value.values.to_numpy(zero_copy_only=False) if pa.types.is_list(value.type) else value.as_py()
        return self.decode_row(row, targets)
