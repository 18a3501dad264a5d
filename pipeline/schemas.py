"""The schema of every artifact speechkd writes, in one place, each versioned.

Bump an artifact's version whenever its columns or their meaning change; readers
refuse files whose version they do not know.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

# --- default layout on disk (everything under data/ is generated and git-ignored)
DATA_DIR = Path("data")
SAMPLES_DIR = DATA_DIR / "samples"
AUDIO_DIR = DATA_DIR / "audio"
FEATURES_DIR = DATA_DIR / "features"
MODELS_DIR = DATA_DIR / "models"
# <stage dir><suffix>: the eval split spoken by a voice training never used (flow: --heldout-voice)
HELDOUT_VOICE_SUFFIX = "-heldout-voice"
# ... and by another synthesizer than the training speech's (flow: --heldout-tts)
HELDOUT_TTS_SUFFIX = "-heldout-tts"
TEACHER_DIR = MODELS_DIR / "teacher"
CACHE_DIR = DATA_DIR / "cache"

SPLITS = ("train", "eval")

# Key in a Parquet file's metadata naming the artifact and its version.
ARTIFACT_KEY = b"speechkd.artifact"
VERSION_KEY = b"speechkd.version"

# --- samples: data/samples/samples.parquet
# Version 2: a sample may be a conversation (`messages`); version 1 files read as plain prompt/response samples.
SAMPLES_VERSION = 2
SAMPLES_READABLE_VERSIONS = (1, 2)
SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        # The (last) user turn: what is spoken by default.
        pa.field("prompt", pa.string(), nullable=False),
        # The final assistant turn; may be empty: the teacher can write it.
        pa.field("response", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        # Free-form JSON object (a string), e.g. {"relation": "capital"}.
        pa.field("meta", pa.string(), nullable=False),
        # A conversation's turns as a JSON list of {"role": system|user|assistant, "content": ...}, "" for a plain
        # prompt/response sample (pipeline.chat.conversation reads either).
        pa.field("messages", pa.string(), nullable=False),
    ]
)

# --- rejects: <stage dir>/rejects*.parquet, one schema for every stage
REJECTS_VERSION = 1
REJECTS_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),  # samples | speech | features | cache
        pa.field("sample_id", pa.string()),  # null when the row had no usable id
        pa.field("rendition", pa.string()),  # speech/features only
        pa.field("source_position", pa.int64()),  # row number in the source, when known
        pa.field("field", pa.string(), nullable=False),  # which field was bad
        pa.field("reason", pa.string(), nullable=False),
    ]
)

# --- audio index: data/audio/index.parquet (the audio itself: data/audio/<voice>/...)
# Version 3: `perturbation`, the draw (JSON, pipeline.augment.Perturbation) a clip was perturbed with after
#            synthesis (pipeline.speech --perturb-train), null for a clip as the synthesizer wrote it.
# Version 2: `turn`, the message index of the user turn a clip speaks (a conversation may have several spoken).
AUDIO_INDEX_VERSION = 3
AUDIO_INDEX_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("rendition", pa.string(), nullable=False),  # e.g. "en-us@160"
        pa.field("turn", pa.int32(), nullable=False),  # the spoken user turn's index in the conversation
        pa.field("voice", pa.string(), nullable=False),
        pa.field("rate_wpm", pa.int32(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # relative to the audio dir
        pa.field("duration_s", pa.float32(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("perturbation", pa.string()),  # null: clean
    ]
)

# --- speech features: data/features/part-*.parquet
# Version 4: `turn`, the spoken user turn's index in its conversation (a clip is keyed by sample, rendition, turn).
# Version 3: the clip's voice is a column (it was folded into the rendition id "voice@rate" and parsed back out).
# Version 2: the features as one bytes value per clip. Versions 1 and 2 still read: their voice is
# voice_of_rendition(rendition).
FEATURES_VERSION = 4
FEATURES_READABLE_VERSIONS = (1, 2, 3, 4)  # a store may hold shards of several (shards written since: version 4)
FEATURES_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("rendition", pa.string(), nullable=False),
        pa.field("voice", pa.string(), nullable=False),  # who speaks the clip (the audio index's voice)
        pa.field("turn", pa.int32(), nullable=False),  # the spoken user turn's index (older versions: the last)
        pa.field("n_frames", pa.int32(), nullable=False),
        # the clip's n_frames * n_mels features, frame-major, as little-endian float16 bytes (numpy "<f2").
        # Version 1 stored them as list<halffloat>: a row group decoded several times slower (one Parquet value
        # per feature with its list levels, against one per clip), and the file was larger.
        pa.field("fbank", pa.binary(), nullable=False),
    ]
)


def voice_of_rendition(rendition: str) -> str:
    """The voice of a rendition id `voice@rate` (pipeline.speech's): for audio indexes and features stored without
    a voice column (features before version 3, an audio index of one's own)."""
    return rendition.rsplit("@", 1)[0]


# --- a benchmark subset in VoiceBench's format (hlt-lab/voicebench, as `datasets` writes it: Parquet, or
# save_to_disk): <benchmark dir>/<subset>/... One row per question. Read by student/benchmark.py; the toy world's
# eval split is exported in it (python -m toy.world --export-benchmark). Columns a subset may have beyond these
# (ifeval's instruction_id_list and kwargs, bbh's id naming its task) are read when its scorer needs them.
BENCHMARK_VERSION = 1
AUDIO_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])  # datasets' Audio storage
BENCHMARK_SCHEMA = pa.schema(
    [
        pa.field("audio", AUDIO_STRUCT),  # the spoken question: an audio file's bytes (any format soundfile reads)
        pa.field("prompt", pa.string()),  # the question's text (what the typed channel and the teacher are asked)
        pa.field("reference", pa.string()),  # the answer scored against, where the subset has one (else null)
        pa.field("id", pa.string()),  # the question's id within the subset (the sample id for the toy export)
    ]
)
BENCHMARK_FILE = "benchmark.json"  # optional, at the benchmark's root: {"scorers": {subset: scorer}} for subsets
                                   # VoiceBench does not name (the toy export's)


FEATURES_DTYPE = "<f2"


def artifact_metadata(artifact: str, version: int, extra: dict[str, str] | None = None) -> dict[bytes, bytes]:
    meta = {ARTIFACT_KEY: artifact.encode(), VERSION_KEY: str(version).encode()}
    for key, value in (extra or {}).items():
        meta[f"speechkd.{key}".encode()] = value.encode()
    return meta


def with_metadata(schema: pa.Schema, artifact: str, version: int, extra: dict[str, str] | None = None) -> pa.Schema:
    return schema.with_metadata(artifact_metadata(artifact, version, extra))


def read_metadata(schema: pa.Schema) -> dict[str, str]:
    """speechkd.* keys of a Parquet file's schema metadata, without the prefix."""
    out = {}
    for key, value in (schema.metadata or {}).items():
        if key.startswith(b"speechkd."):
            out[key.decode()[len("speechkd.") :]] = value.decode()
    return out


def check_artifact(
    schema: pa.Schema, path: Path | str, artifact: str, version: int, readable: tuple[int, ...] = ()
) -> dict[str, str]:
    """Refuse a file that is not the expected artifact at the expected version (or one of `readable`)."""
    meta = read_metadata(schema)
    found = (meta.get("artifact"), meta.get("version"))
    if found[0] != artifact or found[1] not in {str(v) for v in (version, *readable)}:
        from pipeline.errors import InputMismatch

        raise InputMismatch(
            f"{path}: expected a speechkd {artifact!r} file at version {version}, found "
            f"artifact={found[0]!r} version={found[1]!r}; regenerate it with the current pipeline "
            f"(or pass --overwrite)"
        )
    return meta

# --- teacher logit cache: <cache dir>/part-*.parquet + manifest.json
# One row per sample. Per response position t (n_tokens of them), in every cache:
#   token_ids[t]        the response token at t (teacher-forced input)
#   token_logprobs[t]   teacher log p(token_ids[t] | prefix), exact (float32)
#   content_sha256      hash of what was scored (prompt + response, or prompt + generation settings for
#                       teacher-written responses: pipeline.fingerprint.content_sha256); a row whose
#                       sample has changed since is stale and is re-scored (teacher) or skipped (student)
# then the targets, in one of two encodings (`targets` in the manifest's fingerprint):
# top-k (`--targets topk`, CACHE_TOPK_FIELDS):
#   top1_ids[t], top1_logprobs[t]   the teacher's most likely token there
#   entropy[t]          entropy (nats) of the kept top-k, renormalized
#   tail_logmass[t]     log of the probability outside the top-k
#   topk_ids            k ids per position in rank order, bit-packed at
#                       `id_bits` bits each (big-endian bit order), n*k values
#   topk_codes          per position, q_r = round((top1 - logprob_r) / step)
#                       is non-decreasing in rank r; stored as q_0 = 0 then the
#                       differences q_r - q_{r-1} (mostly 0..3: zstd shrinks
#                       them to ~2 bits). Decoded: top1 - step * cumsum(diffs).
#                       Worst-case decode error step/2 (top-1 itself: exact).
# sampled (`--targets sampled --draws N`, RS-KD; CACHE_SAMPLED_FIELDS): per position, N ids drawn with
# replacement from the teacher's full distribution at the draw temperature, kept as its distinct ids + counts:
#   draw_ids            the distinct drawn ids, ascending within a position, positions in order, bit-packed at
#                       `id_bits` bits each like topk_ids
#   draw_counts         how often each of them was drawn (1..N); a position's counts sum to N, so entry e
#                       belongs to position (sum of the counts before it) // N: no per-position length is stored
# The encoding (targets, k or N and the draw temperature and seed, id_bits, step) and the teacher fingerprint are
# in the manifest and in each shard's metadata (speechkd.encoding, speechkd.fingerprint).
#   turn_starts, turn_lengths   the scored assistant turns: each one's first position in the conversation's token
#                       sequence and its length (they sum to n_tokens); one turn unless cached with --turns all
# Version 2: content_sha256 added, fingerprint in each shard. Version 3: the targets' encoding is named
# (`targets`: topk | sampled) and sampled targets exist. Version 4: the turns (version 3 caches still read: one turn).
CACHE_VERSION = 4
CACHE_READABLE_VERSIONS = (3, 4)  # a version 3 cache is read, and appended to (its new shards are version 4)
# The targets' encoding (codec) has its own version, in the fingerprint: a cache is appended to only by its own.
CACHE_ENCODING_VERSION = 3
CACHE_COMMON_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("content_sha256", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),  # the text that was scored
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("token_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("turn_starts", pa.list_(pa.int32()), nullable=False),
    pa.field("turn_lengths", pa.list_(pa.int32()), nullable=False),
]
CACHE_TOPK_FIELDS = [
    pa.field("top1_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("top1_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("entropy", pa.list_(pa.float16()), nullable=False),
    pa.field("tail_logmass", pa.list_(pa.float16()), nullable=False),
    pa.field("topk_ids", pa.binary(), nullable=False),
    pa.field("topk_codes", pa.list_(pa.uint16()), nullable=False),
]
CACHE_SAMPLED_FIELDS = [
    pa.field("draw_ids", pa.binary(), nullable=False),
    pa.field("draw_counts", pa.list_(pa.uint8()), nullable=False),
]
CACHE_TARGETS = ("topk", "sampled")


def cache_schema(targets: str = "topk") -> pa.Schema:
    """The cache rows' schema for one target encoding (topk | sampled)."""
    extra = {"topk": CACHE_TOPK_FIELDS, "sampled": CACHE_SAMPLED_FIELDS}[targets]
    return pa.schema(CACHE_COMMON_FIELDS + extra)

