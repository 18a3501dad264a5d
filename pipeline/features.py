"""Speech features of every clip: Kaldi-compatible log-mel filterbanks (torchaudio), or Whisper's log-mel.

    python -m pipeline.features                      # over data/audio/index.parquet
    python -m pipeline.features --audio-index my_index.parquet --n-mels 128
    python -m pipeline.features --kind whisper --out data/features_whisper   # for --encoder openai/whisper-*

`--kind fbank` (default): torchaudio's Kaldi fbank, for the built-in
conv-transformer encoder. `--kind whisper`: the log-mel spectrogram of
transformers' WhisperFeatureExtractor (normalized as Whisper does), stored
unpadded; the Whisper encoder pads it to its 30 s window itself (`--n-mels 128`
for whisper-large-v3).

Input is an audio index (sample_id, rendition, path; paths relative to the
index's directory or absolute), the one `pipeline.speech` writes or your own.
Output: zstd Parquet shards keyed by (sample_id, rendition, turn) with n_frames and
the fbank as float16 (frame-major); the feature config is in each file's
metadata. Resumable: clips already in a shard are skipped; corrupt, empty or
missing audio goes to data/rejects/features.parquet with the reason.

    duckdb -c "SELECT count(*), sum(n_frames) FROM 'data/features/*.parquet'"
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchaudio.compliance.kaldi as kaldi
from tqdm import tqdm

from pipeline import schemas
from pipeline.audio import BadAudio, load_audio, read_audio_index  # noqa: F401 - load_audio: the features' input
from pipeline.config import ConfigError, config_from_args, opt, parse_args
from pipeline.errors import CorruptData, InputMismatch, MissingInput, cli
from pipeline.files import sha256_file, verify_file, write_json_atomic
from pipeline.parquet_io import (
    next_shard_path,
    reject,
    rejects_path,
    rejects_table,
    remove_stale_temp_files,
    RowGroupReader,
    shard_paths,
    write_table_atomic,
)

SHARD_PREFIX = "part-"
MANIFEST = "manifest.json"  # every shard's rows, bytes and sha256, and the audio index it was extracted from
ROW_GROUP_ROWS = 64  # clips per Parquet row group: the unit a random read decodes
# How a features shard is written: small row groups (the student reads clips by key, a row group at a time, see
# FeatureStore), and no dictionary encoding for the features themselves: pyarrow dictionary-encodes every column by
# default, which made a row group several times slower to decode (docs/design.md, "Features";
# `python -m bench.student_data --compare-formats` measures the data path over every format).
WRITE_OPTIONS = {"row_group_size": ROW_GROUP_ROWS, "use_dictionary": ["sample_id", "rendition", "voice"]}
FEATURE_KINDS = ("fbank", "whisper")
WHISPER_WINDOW_S = 30.0  # Whisper encoders see at most 30 s


@dataclass(frozen=True)
class FeatureConfig:
    """What a clip's features are (stored in every shard's metadata: a store holds one config)."""

    kind: str = opt("fbank", "fbank (torchaudio's Kaldi fbank, the built-in encoders) or whisper (the log-mel of "
                             "WhisperFeatureExtractor, for --encoder openai/whisper-*)", FEATURE_KINDS)  # fmt: skip
    n_mels: int = opt(80, "mel bins")
    sample_rate: int = opt(16_000, "audio is resampled to this rate")
    frame_length_ms: float = opt(25.0, "analysis window")
    frame_shift_ms: float = opt(10.0, "hop between frames")
    # Kaldi conventions: int16-scaled input, no dither (deterministic), povey window.
    dither: float = opt(0.0, "fbank dither (0: deterministic)")
    window: str = opt("povey", "fbank window type")

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise ConfigError(f"--kind {self.kind!r} is not one of {', '.join(FEATURE_KINDS)}")

    @classmethod
    def from_json(cls, text: str) -> "FeatureConfig":
        return cls(**json.loads(text))  # shards from before `kind` existed are fbank

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class ExtractConfig:
    """`python -m pipeline.features`: which clips, where the shards go (the features themselves: FeatureConfig)."""

    audio_index: str = opt(str(schemas.AUDIO_DIR / "index.parquet"), "the audio index (sample_id, rendition, path; "
                                                                      "paths relative to it)")  # fmt: skip
    out: str = opt(str(schemas.FEATURES_DIR), "features directory")
    rows_per_shard: int = opt(1000, "clips per Parquet shard")
    overwrite: bool = opt(False, "replace shards made with another feature config")


def fbank(wave: torch.Tensor, cfg: FeatureConfig, vtln_warp: float = 1.0) -> torch.Tensor:
    """(n_frames, n_mels) float32 log-mel filterbank of a mono waveform; `vtln_warp` != 1 warps the mel filters'
    frequencies (Kaldi's VTLN: a training-time vocal-tract-length perturbation, pipeline.augment)."""
    min_len = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    if wave.numel() < min_len:
        raise BadAudio(f"audio shorter than one {cfg.frame_length_ms:g} ms frame ({wave.numel()} samples)")
    return kaldi.fbank(
        wave.unsqueeze(0) * 32768.0,
        num_mel_bins=cfg.n_mels,
        sample_frequency=cfg.sample_rate,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
        dither=cfg.dither,
        window_type=cfg.window,
        energy_floor=0.0,
        vtln_warp=vtln_warp,
    )


@lru_cache(maxsize=4)
def _whisper_extractor(n_mels: int, sample_rate: int, n_fft: int, hop: int):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=sample_rate, n_fft=n_fft, hop_length=hop)


def whisper_logmel(wave: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """(n_frames, n_mels) Whisper log-mel of a mono waveform, unpadded.

    Equal to the first n_frames of WhisperFeatureExtractor's 30 s padded output
    except the last frame (its window sees the clip's end instead of padding);
    the padding itself is restored by the encoder (`student.model.WhisperEncoder`).
    """
    if wave.numel() > WHISPER_WINDOW_S * cfg.sample_rate:
        raise BadAudio(f"audio longer than Whisper's {WHISPER_WINDOW_S:g} s window ({wave.numel() / cfg.sample_rate:.1f} s)")
    n_fft = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    if wave.numel() < n_fft:
        raise BadAudio(f"audio shorter than one {cfg.frame_length_ms:g} ms frame ({wave.numel()} samples)")
    extractor = _whisper_extractor(cfg.n_mels, cfg.sample_rate, n_fft, int(cfg.sample_rate * cfg.frame_shift_ms / 1000))
    out = extractor(wave.numpy(), sampling_rate=cfg.sample_rate, padding="longest", return_tensors="np")
    return torch.from_numpy(out["input_features"][0].T.copy())


def compute_features(wave: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """(n_frames, n_mels) features of the configured kind."""
    return whisper_logmel(wave, cfg) if cfg.kind == "whisper" else fbank(wave, cfg)


def _feature_schema(cfg: FeatureConfig) -> pa.Schema:
    return schemas.with_metadata(
        schemas.FEATURES_SCHEMA, "features", schemas.FEATURES_VERSION, {"feature_config": cfg.to_json()}
    )


def check_shard(schema: pa.Schema, path: Path) -> dict[str, str]:
    """A features shard's speechkd metadata; refuses anything but a features shard of a readable version."""
    return schemas.check_artifact(schema, path, "features", schemas.FEATURES_VERSION,
                                  schemas.FEATURES_READABLE_VERSIONS)  # fmt: skip


def encode_clip(feats: torch.Tensor) -> bytes:
    """A clip's (n_frames, n_mels) features as stored: float16, frame-major, little-endian."""
    return feats.to(torch.float16).numpy().astype(schemas.FEATURES_DTYPE, copy=False).tobytes()


def existing_keys(features_dir: Path, cfg: FeatureConfig, overwrite: bool = False) -> set[tuple[str, str, int]]:
    """Keys (sample_id, rendition, turn) already stored; refuses shards made with another feature config, and names
    one that is not readable."""
    keys: set[tuple[str, str, int]] = set()
    for path in shard_paths(features_dir, SHARD_PREFIX):
        meta = check_shard(open_shard(path, Path(features_dir)).schema_arrow, path)
        stored = meta.get("feature_config")
        if stored is None or FeatureConfig.from_json(stored) != cfg:
            if overwrite:
                path.unlink()
                continue
            raise InputMismatch(f"{path} was made with feature config {meta.get('feature_config')}, not "
                                f"{cfg.to_json()}; use another --out directory or pass --overwrite to replace it")  # fmt: skip
        t = pq.read_table(path)
        turns = t["turn"].to_pylist() if "turn" in t.column_names else [0] * t.num_rows  # before version 4: turn 0
        keys.update(zip(t["sample_id"].to_pylist(), t["rendition"].to_pylist(), turns))
    return keys


@dataclass
class FeaturesResult:
    written: int
    skipped: int
    rejects: pa.Table
    shards: list[Path]


def read_manifest(features_dir: Path) -> dict:
    path = Path(features_dir) / MANIFEST
    if not path.exists():
        return {"shards": {}}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise CorruptData(f"{path}: not readable JSON; delete it and run `python -m pipeline.features` again on this "
                          f"directory (it lists the shards there again)") from None  # fmt: skip


def _shard_entry(path: Path) -> dict:
    return {"rows": pq.read_metadata(path).num_rows, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def rebuild_command(features_dir: Path, manifest: dict | None = None) -> str:
    index = (manifest or {}).get("audio_index") or "<the audio index>"
    return f"`python -m pipeline.features --audio-index {index} --out {features_dir}`"


def open_shard(path: Path, features_dir: Path, manifest: dict | None = None) -> pq.ParquetFile:
    """A features shard opened for reading, or CorruptData naming it when it is no Parquet file any more."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptData(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]}); delete it and run "
                          f"{rebuild_command(features_dir, manifest)} again: it re-extracts the clips that are "
                          f"missing") from None  # fmt: skip


def verify_shards(features_dir: Path, verify: bool = True) -> list[Path]:
    """The store's shards, each checked against the bytes and sha256 its manifest recorded (`verify`); CorruptData
    naming the first that differs and the command that rebuilds it. Shards a store made before manifests has no
    entry for are read with a one-line note."""
    features_dir = Path(features_dir)
    manifest = read_manifest(features_dir)
    shards = shard_paths(features_dir, SHARD_PREFIX)
    listed = manifest["shards"]
    fix = (f"delete it and run {rebuild_command(features_dir, manifest)} again: it re-extracts the clips that are "
           f"missing (or read without checking, --no-verify, at your own risk)")  # fmt: skip
    for name in listed:
        if not (features_dir / name).exists():
            raise CorruptData(f"{features_dir / name}: listed in {features_dir / MANIFEST} but missing; run "
                              f"{rebuild_command(features_dir, manifest)} again: it re-extracts its clips")  # fmt: skip
    if verify:
        unlisted = [p.name for p in shards if p.name not in listed]
        if unlisted:
            print(f"note: {len(unlisted)} feature shard(s) in {features_dir} have no checksums (written by an older "
                  f"speechkd): not verified")  # fmt: skip
        for p in shards:
            entry = listed.get(p.name)
            if entry is None:
                continue
            verify_file(p, entry, MANIFEST, fix)
    return shards


def extract_all(
    audio_index: Path = schemas.AUDIO_DIR / "index.parquet",
    out_dir: Path = schemas.FEATURES_DIR,
    cfg: FeatureConfig = FeatureConfig(),
    rows_per_shard: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> FeaturesResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    done = existing_keys(out_dir, cfg, overwrite)
    rows = read_audio_index(Path(audio_index))
    manifest = read_manifest(out_dir)
    manifest["audio_index"] = str(Path(audio_index))
    for path in shard_paths(out_dir, SHARD_PREFIX):  # adopt what is there: a shard the manifest missed, an old store
        manifest["shards"].setdefault(path.name, _shard_entry(path))
    manifest["shards"] = {n: e for n, e in manifest["shards"].items() if (out_dir / n).exists()}
    write_json_atomic(out_dir / MANIFEST, manifest)
    todo = [r for r in rows if (r["sample_id"], r["rendition"], r["turn"]) not in done]
    schema = _feature_schema(cfg)
    buffer: dict[str, list] = {f.name: [] for f in schema}
    rejected, shards = [], []

    def flush():
        if buffer["sample_id"]:
            table = pa.table(buffer, schema=schema)
            shard = write_table_atomic(table, next_shard_path(out_dir, SHARD_PREFIX), **WRITE_OPTIONS)
            manifest["shards"][shard.name] = _shard_entry(shard)
            write_json_atomic(out_dir / MANIFEST, manifest)  # a shard then its entry: a kill between, adopted next run
            shards.append(shard)
            for col in buffer.values():
                col.clear()

    written = 0
    for r in tqdm(todo, desc="features", unit="clip", disable=not progress):
        try:
            feats = compute_features(load_audio(r["path"], cfg.sample_rate), cfg)
        except BadAudio as exc:
            rejected.append(reject("features", "audio", str(exc), sample_id=r["sample_id"], rendition=r["rendition"]))
            continue
        buffer["sample_id"].append(r["sample_id"])
        buffer["rendition"].append(r["rendition"])
        buffer["voice"].append(r["voice"])
        buffer["turn"].append(r["turn"])
        buffer["n_frames"].append(feats.shape[0])
        buffer["fbank"].append(encode_clip(feats))
        written += 1
        if len(buffer["sample_id"]) >= rows_per_shard:
            flush()
    flush()
    rejects = rejects_table(rejected)
    write_table_atomic(rejects, rejects_path(out_dir, "features"))
    return FeaturesResult(written, len(rows) - len(todo), rejects, shards)


def feature_config_of(features_dir: Path) -> FeatureConfig:
    shards = shard_paths(features_dir, SHARD_PREFIX)
    if not shards:
        raise MissingInput(f"no feature shards in {features_dir}: run `python -m pipeline.features` first")
    meta = check_shard(pq.read_schema(shards[0]), shards[0])
    return FeatureConfig.from_json(meta["feature_config"])


def load_features(features_dir: Path = schemas.FEATURES_DIR) -> dict[tuple[str, str, int], np.ndarray]:
    """All stored features as {(sample_id, rendition, turn): (n_frames, n_mels) float16}. Loads everything: for
    tests and small sets; the student reads through FeatureStore instead."""
    store = FeatureStore(features_dir)
    return store.get(list(store.keys()))


class FeatureStore:
    """Clips by (sample_id, rendition, turn) without loading the store: an index of where each clip is
    (shard, row group, row) and reads of whole row groups (parquet_io.RowGroupReader), the last
    `keep_row_groups` of them kept per process.

    The index holds three small columns per clip; features are read only when asked for.
    """

    def __init__(self, features_dir: Path | str, keep_row_groups: int = 32, verify: bool = True):
        """Every shard is checked against its manifest's sha256 first (`verify`; never for unreadable Parquet)."""
        self.dir = Path(features_dir)
        self.shards = verify_shards(self.dir, verify)
        manifest = read_manifest(self.dir)
        for path in self.shards:
            open_shard(path, self.dir, manifest)
        self.cfg = feature_config_of(self.dir)
        self._groups = RowGroupReader(self.shards, keep=keep_row_groups)
        sids, rends, voices, turns, shard_of, group_of, row_of, frames = [], [], [], [], [], [], [], []
        self._as_list: list[bool] = []  # per shard: version 1 (features as list<halffloat>)
        for s, path in enumerate(self.shards):
            pf = self._groups.file(s)
            meta = check_shard(pf.schema_arrow, path)
            self._as_list.append(meta["version"] == "1")
            if FeatureConfig.from_json(meta["feature_config"]) != self.cfg:
                raise ValueError(f"{path} holds features of another config than {self.shards[0]}; re-extract them")
            has_voice = "voice" in pf.schema_arrow.names  # version 3; before, the voice is in the rendition id
            has_turn = "turn" in pf.schema_arrow.names  # version 4; before, every clip is turn 0 (a plain sample's)
            extra = (["voice"] if has_voice else []) + (["turn"] if has_turn else [])
            for g in range(pf.num_row_groups):
                t = self._groups.read(s, g, ["sample_id", "rendition", "n_frames"] + extra, keep=False)
                turns.extend(t["turn"].to_pylist() if has_turn else [0] * t.num_rows)
                sids.extend(t["sample_id"].to_pylist())
                rends.extend(t["rendition"].to_pylist())
                voices.extend(t["voice"].to_pylist() if has_voice else
                              [schemas.voice_of_rendition(r) for r in t["rendition"].to_pylist()])  # fmt: skip
                frames.append(t["n_frames"].to_numpy())
                shard_of.append(np.full(t.num_rows, s, dtype=np.int32))
                group_of.append(np.full(t.num_rows, g, dtype=np.int32))
                row_of.append(np.arange(t.num_rows, dtype=np.int32))
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int32)  # noqa: E731
        self.sample_ids = np.array(sids, dtype=object)
        self.renditions = np.array(rends, dtype=object)
        self.voices = np.array(voices, dtype=object)
        self.turns = np.array(turns, dtype=np.int64)
        self.n_frames, self.shard, self.group, self.row = cat(frames), cat(shard_of), cat(group_of), cat(row_of)
        self._pos = {key: i for i, key in enumerate(zip(sids, rends, turns))}

    def __len__(self) -> int:
        return len(self.sample_ids)

    def keys(self):
        """(sample_id, rendition, turn) of every clip, by position."""
        return zip(self.sample_ids.tolist(), self.renditions.tolist(), self.turns.tolist())

    def read(self, i: int) -> np.ndarray:
        """Clip at index position i: (n_frames, n_mels) float16."""
        shard = int(self.shard[i])
        value = self._groups.read(shard, int(self.group[i]), ["fbank"])["fbank"][int(self.row[i])]
        if self._as_list[shard]:
            values = value.values.to_numpy(zero_copy_only=False)
        else:
            values = np.frombuffer(value.as_buffer(), dtype=schemas.FEATURES_DTYPE)
        if values.size != int(self.n_frames[i]) * self.cfg.n_mels:
            raise CorruptData(f"{self.shards[shard]}: clip {self.sample_ids[i]!r} ({self.renditions[i]}) holds "
                              f"{values.size} values, not n_frames {self.n_frames[i]} x {self.cfg.n_mels} mels; "
                              "delete the shard and run `python -m pipeline.features` again: it re-extracts "
                              "the clips that are missing")  # fmt: skip
        return values.reshape(int(self.n_frames[i]), self.cfg.n_mels).astype(np.float16, copy=False)

    def get(self, keys) -> dict[tuple[str, str, int], np.ndarray]:
        """{(sample_id, rendition, turn): features} for the keys, read in storage order."""
        pos = sorted((self._pos[k], k) for k in keys)
        return {k: self.read(i) for i, k in pos}


@cli("pipeline.features")
def main(argv: list[str] | None = None) -> None:
    args = parse_args(FeatureConfig, ExtractConfig, argv=argv, description=__doc__)
    cfg, run = config_from_args(FeatureConfig, args), config_from_args(ExtractConfig, args)
    result = extract_all(Path(run.audio_index), Path(run.out), cfg, run.rows_per_shard, run.overwrite)
    print(
        f"features: {result.written} clips extracted, {result.skipped} already there, "
        f"{result.rejects.num_rows} rejected -> {run.out} ({cfg.kind}, {cfg.n_mels} mel bins)"
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
