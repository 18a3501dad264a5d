"""The teacher logit cache: zstd Parquet shards, one row per sample, plus manifest.json.

    codec    one sample's targets <-> a row (top-k or sampled; schemas.cache_schema)
    layout   manifests, partitions, locks, shard checks (the directory's contract)
    writer   CacheWriter: append exactly once
    reader   CacheReader: verified reads by id, by shard, by row group

The names below are the package's interface; import them from `pipeline.cache`.
"""

from pipeline.cache.codec import (
    DECODED_COLUMNS,
    MAX_CODE_NATS,
    TARGET_COLUMNS,
    CacheEncoding,
    ScoredSample,
    decode_sampled,
    decode_topk,
    encode,
    encode_sampled,
    encode_topk,
    pack_ids,
    rows_to_table,
    unpack_ids,
)
from pipeline.cache.layout import (
    FINGERPRINT_KEYS,
    MANIFEST,
    PARTITION_PREFIX,
    PARTITIONED,
    SHARD_PREFIX,
    FingerprintMismatch,
    Locks,
    cache_partitions,
    cache_shards,
    check_shard,
    fix_command,
    open_cache_layout,
    partition_dir,
    partition_of,
    read_manifest,
    relative_to,
    replaces_other_setup,
    shard_fingerprint,
    write_manifest,
)
from pipeline.cache.reader import CacheReader
from pipeline.cache.writer import ROW_GROUP_ROWS, CacheWriter

__all__ = [
    "CacheEncoding",
    "CacheReader",
    "CacheWriter",
    "DECODED_COLUMNS",
    "FINGERPRINT_KEYS",
    "FingerprintMismatch",
    "Locks",
    "MANIFEST",
    "MAX_CODE_NATS",
    "PARTITIONED",
    "PARTITION_PREFIX",
    "ROW_GROUP_ROWS",
    "SHARD_PREFIX",
    "ScoredSample",
    "TARGET_COLUMNS",
    "cache_partitions",
    "cache_shards",
    "check_shard",
    "decode_sampled",
    "decode_topk",
    "encode",
    "encode_sampled",
    "encode_topk",
    "fix_command",
    "open_cache_layout",
    "pack_ids",
    "partition_dir",
    "partition_of",
    "read_manifest",
    "relative_to",
    "replaces_other_setup",
    "rows_to_table",
    "shard_fingerprint",
    "unpack_ids",
    "write_manifest",
]
