"""Reading a cache without loading it whole: by sample id, streaming shards, or a row group at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.cache.codec import (DECODED_COLUMNS, TARGET_COLUMNS, TURN_COLUMNS, CacheEncoding, decode_sampled,
                                  decode_topk)
from pipeline.cache.layout import (MANIFEST, cache_partitions, cache_shards, check_shard, current_fingerprint,
                                   fix_command, read_manifest)
from pipeline.errors import CorruptData, InputMismatch, MissingInput
from pipeline.parquet_io import RowGroupReader


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
        if manifest.get("schema_version") not in schemas.CACHE_READABLE_VERSIONS:
            raise InputMismatch(
                f"{self.dir}: cache schema version {manifest.get('schema_version')}, this speechkd reads "
                f"{', '.join(map(str, schemas.CACHE_READABLE_VERSIONS))}; rebuild the cache"
            )
        self.manifest = manifest
        self.fingerprint = current_fingerprint(manifest["fingerprint"], manifest.get("schema_version"))
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
        draw_counts (n, m) of a sampled one; turn_starts, turn_lengths the scored turns (a version 3 row: one
        turn, start -1)."""
        n = len(row["token_ids"])
        out = {
            "sample_id": row["sample_id"],
            "response": row["response"],
            "token_ids": np.asarray(row["token_ids"], dtype=np.int64),
            "token_logprobs": np.asarray(row["token_logprobs"], dtype=np.float32),
            "turn_starts": np.asarray(row.get("turn_starts", [-1]), dtype=np.int64),
            "turn_lengths": np.asarray(row.get("turn_lengths", [n]), dtype=np.int64),
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
        names = DECODED_COLUMNS + (TARGET_COLUMNS[self.targets] if targets else ())
        names += tuple(c for c in TURN_COLUMNS if c in table.column_names)
        for name in names:
            value = table[name][i]
            row[name] = value.values.to_numpy(zero_copy_only=False) if pa.types.is_list(value.type) else value.as_py()
        return self.decode_row(row, targets)
