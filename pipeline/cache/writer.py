"""Appending to a cache partition, exactly once: atomic shards, then the manifest that records them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.cache.codec import CacheEncoding, rows_to_table
from pipeline.cache.layout import (FINGERPRINT_KEYS, SHARD_PREFIX, Locks, check_shard, current_fingerprint,
                                   read_manifest, relative_to, replaces_other_setup, shard_fingerprint,
                                   write_manifest)
from pipeline.errors import InputMismatch
from pipeline.files import atomic_write, remove_stale_temp_files, sha256_file
from pipeline.fingerprint import diff
from pipeline.parquet_io import COMPRESSION, COMPRESSION_LEVEL, next_shard_path, shard_paths, write_table_atomic

ROW_GROUP_ROWS = 256  # cache rows per Parquet row group: the unit the student reads and shuffles


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
        self._locks = Locks([self.dir], "one writer per cache partition")
        self.written = 0
        self.bytes_written = 0
        self.removed = 0

    def __enter__(self) -> "CacheWriter":
        self._locks.__enter__()
        remove_stale_temp_files(self.dir)
        manifest = read_manifest(self.dir)
        if manifest is not None and manifest.get("schema_version") not in schemas.CACHE_READABLE_VERSIONS:
            if not self.overwrite:
                raise InputMismatch(f"{self.dir}: cache schema version {manifest.get('schema_version')}, this "
                                    f"speechkd writes {schemas.CACHE_VERSION}; rebuild it with --overwrite")  # fmt: skip
            manifest = {"fingerprint": {}, "shards": dict.fromkeys(manifest.get("shards", {}))}
        if manifest is not None:  # a version 3 cache is appended to: its new shards are version 4
            manifest["fingerprint"] = current_fingerprint(manifest["fingerprint"], manifest.get("schema_version"))
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
        write_manifest(self.dir, manifest)
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
        return {"rows": pq.read_metadata(path).num_rows, "bytes": path.stat().st_size, "sha256": sha256_file(path)}

    def _shard_schema(self, version: int = schemas.CACHE_VERSION) -> pa.Schema:
        """The schema (and metadata) of a shard written now; `version` 3: the metadata of a version 3 shard being
        rewritten without some rows (its columns stay as they are)."""
        fp = {k: self.fingerprint.get(k) for k in FINGERPRINT_KEYS}
        return schemas.with_metadata(schemas.cache_schema(self.encoding.targets), "cache", version,
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
            elif path.exists() and sha256_file(path) == new_sha:  # the rewrite landed: record it
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
                table = pq.read_table(path).take(keep)
                version = schemas.CACHE_VERSION if "turn_lengths" in table.column_names else 3
                table = table.replace_schema_metadata(self._shard_schema(version).metadata)
                with atomic_write(path) as tmp:  # renamed over the shard only once the journal has its checksum
                    pq.write_table(table, tmp, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL,
                                   row_group_size=ROW_GROUP_ROWS)  # fmt: skip
                    digest = sha256_file(tmp)
                    self.manifest["pending"][path.name] = digest
                    write_manifest(self.dir, self.manifest)
                self.manifest["shards"][path.name] = {"rows": len(keep), "bytes": path.stat().st_size, "sha256": digest}
            else:
                self.manifest["pending"][path.name] = None
                write_manifest(self.dir, self.manifest)
                path.unlink()
                self.manifest["shards"].pop(path.name, None)
            del self.manifest["pending"][path.name]
            self.manifest.pop("pending")
            write_manifest(self.dir, self.manifest)
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
        path = write_table_atomic(table, next_shard_path(self.dir, SHARD_PREFIX),
                                  row_group_size=ROW_GROUP_ROWS)
        entry = self._shard_entry(path)
        self.manifest["shards"][path.name] = entry
        write_manifest(self.dir, self.manifest)
        self.written += len(self._rows)
        self.bytes_written += entry["bytes"]
        self._rows = []

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._locks.__exit__()
