"""The cache's codec: how one sample's teacher targets become a row and back (schemas.cache_schema).

Top-k targets: ids bit-packed at ceil(log2 vocab) bits in rank order, logprobs quantized against the position's
top-1 in steps of `logprob_step` and stored as rank-to-rank differences (mostly 0..3: zstd packs them to ~2 bits).
Sampled targets (RS-KD): each position's distinct drawn ids, ascending, bit-packed, and their counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import schemas

# The columns decode_row reads: always, and for the targets of each encoding.
DECODED_COLUMNS = ("sample_id", "response", "n_tokens", "token_ids", "token_logprobs")
TURN_COLUMNS = ("turn_starts", "turn_lengths")  # since cache version 4 (a version 3 row: one turn)
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
    version: int = schemas.CACHE_ENCODING_VERSION
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
    # the scored assistant turns: each one's first position in the conversation's tokens and its length (sum: n);
    # None: one turn (its start unknown, -1)
    turn_starts: list[int] | None = None
    turn_lengths: list[int] | None = None


def _common_columns(s: ScoredSample) -> dict:
    lengths = s.turn_lengths if s.turn_lengths is not None else [len(s.token_ids)]
    starts = s.turn_starts if s.turn_starts is not None else [-1]
    if sum(lengths) != len(s.token_ids) or len(starts) != len(lengths):
        raise ValueError(f"sample {s.sample_id}: turns of lengths {lengths} (starts {starts}) do not cover its "
                         f"{len(s.token_ids)} scored tokens")  # fmt: skip
    return {
        "sample_id": s.sample_id,
        "content_sha256": s.content_sha256,
        "response": s.response,
        "n_tokens": len(s.token_ids),
        "token_ids": s.token_ids.astype(np.int32),
        "token_logprobs": s.token_logprobs.astype(np.float32),
        "turn_starts": np.asarray(starts, dtype=np.int32),
        "turn_lengths": np.asarray(lengths, dtype=np.int32),
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
