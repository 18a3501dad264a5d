import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from pipeline.errors import CorruptData
from pipeline.features import FeatureConfig, FeatureStore, extract_all, feature_config_of, load_features
from pipeline.parquet_io import rejects_path
from pipeline.speech import synthesize_all


@pytest.fixture(scope="module")
def audio_index(samples_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audio")
    synthesize_all(samples_dir, out, voices=("en-us",), rates=(170,), progress=False)
    return out / "index.parquet"


def test_features_shape_and_determinism(audio_index, tmp_path):
    cfg = FeatureConfig(n_mels=40)
    a = extract_all(audio_index, tmp_path / "a", cfg, rows_per_shard=7, progress=False)
    extract_all(audio_index, tmp_path / "b", cfg, rows_per_shard=7, progress=False)
    index = pq.read_table(audio_index).to_pylist()
    assert a.written == len(index) and a.rejects.num_rows == 0 and len(a.shards) > 1
    fa, fb = load_features(tmp_path / "a"), load_features(tmp_path / "b")
    assert fa.keys() == fb.keys() == {(r["sample_id"], r["rendition"], r["turn"]) for r in index}
    for r in index:
        feats = fa[(r["sample_id"], r["rendition"], r["turn"])]
        assert feats.dtype == np.float16 and feats.shape[1] == 40
        # 10 ms shift, 25 ms window: frames = 1 + (samples - 400) // 160
        n = round(r["duration_s"] * 16000)
        assert feats.shape[0] == 1 + (n - 400) // 160
        assert np.isfinite(feats).all() and feats.astype(np.float32).std() > 0.5
        np.testing.assert_array_equal(feats, fb[(r["sample_id"], r["rendition"], r["turn"])])
    assert feature_config_of(tmp_path / "a") == cfg
    count, frames = duckdb.sql(f"SELECT count(*), sum(n_frames) FROM '{tmp_path / 'a'}/*.parquet'").fetchall()[0]
    assert count == len(index) and frames == sum(f.shape[0] for f in fa.values())
    # one value per clip (since version 2), not dictionary-encoded (4x slower to decode), in 64-clip row groups
    for path in a.shards:
        meta = pq.ParquetFile(path).metadata
        fbank = [meta.schema.column(i).path for i in range(meta.num_columns)].index("fbank")
        for g in range(meta.num_row_groups):
            assert meta.row_group(g).column(fbank).physical_type == "BYTE_ARRAY"
            assert "RLE_DICTIONARY" not in meta.row_group(g).column(fbank).encodings
            assert meta.row_group(g).num_rows <= 64


def as_older_version(path: Path, out: Path, version: int) -> None:
    """A version 4 features shard rewritten as an older version wrote it: no turn column (version 3); no voice
    column either (version 2); and list<halffloat> features, every column dictionary-encoded, pyarrow's default
    (version 1)."""
    table = pq.read_table(path).drop_columns(["turn"])
    if version <= 2:
        table = table.drop_columns(["voice"])
    if version == 1:
        lists = pa.array([np.frombuffer(b, "<f2") for b in table["fbank"].to_pylist()], pa.list_(pa.float16()))
        table = table.set_column(table.schema.get_field_index("fbank"),
                                 pa.field("fbank", pa.list_(pa.float16()), nullable=False), lists)  # fmt: skip
    meta = {**table.schema.metadata, b"speechkd.version": str(version).encode()}
    pq.write_table(table.replace_schema_metadata(meta), out, compression="zstd")


def test_older_versions_read_beside_version_4_and_a_short_clip_is_refused(audio_index, tmp_path):
    cfg = FeatureConfig(n_mels=40)
    a = extract_all(audio_index, tmp_path / "a", cfg, rows_per_shard=7, progress=False)
    expected = load_features(tmp_path / "a")
    voices = dict(zip(FeatureStore(tmp_path / "a").keys(), FeatureStore(tmp_path / "a").voices))
    assert set(voices.values()) == {"en-us"}  # the voice column (version 3): the audio index's voice
    assert len(a.shards) > 3
    for shard, version in ((0, 1), (2, 2), (3, 3)):  # a store made before versions 2, 3 and 4, then appended to
        as_older_version(a.shards[shard], tmp_path / "old.parquet", version)
        os.replace(tmp_path / "old.parquet", a.shards[shard])
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for shard in (0, 2, 3):  # a store made before checksums: those shards have no entry
        del manifest["shards"][a.shards[shard].name]
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    assert pq.read_schema(a.shards[0]).field("fbank").type == pa.list_(pa.float16())
    assert "voice" not in pq.read_schema(a.shards[2]).names and "turn" not in pq.read_schema(a.shards[3]).names
    mixed = load_features(tmp_path / "a")
    assert mixed.keys() == expected.keys()
    for key, feats in expected.items():
        assert mixed[key].dtype == np.float16
        np.testing.assert_array_equal(mixed[key], feats)
    store = FeatureStore(tmp_path / "a")
    assert dict(zip(store.keys(), store.voices)) == voices  # older shards: the voice of the rendition id
    assert extract_all(audio_index, tmp_path / "a", cfg, progress=False).written == 0  # resumes over all four
    # a clip whose bytes do not hold n_frames x n_mels values is corrupt data, named, never reshaped
    table = pq.read_table(a.shards[1])
    clipped = pa.array([b[:-2] if i == 0 else b for i, b in enumerate(table["fbank"].to_pylist())], pa.binary())
    fbank = table.schema.get_field_index("fbank")
    pq.write_table(table.set_column(fbank, table.schema.field("fbank"), clipped), a.shards[1])
    with pytest.raises(CorruptData, match=r"part-00001.parquet: \d+ bytes, manifest.json recorded \d+ .* pipeline.features --audio-index"):
        FeatureStore(tmp_path / "a")  # verified on open: the rewritten shard is refused, named, with the rebuild command
    store = FeatureStore(tmp_path / "a", verify=False)
    first = int(np.flatnonzero((store.shard == 1) & (store.row == 0))[0])
    assert store.sample_ids[first] == table["sample_id"][0].as_py()
    with pytest.raises(CorruptData, match=r"part-00001.parquet: clip .* holds \d+ values, not n_frames \d+ x 40 mels"):
        store.read(first)


def test_corrupt_empty_and_missing_audio_are_rejected_with_reasons(audio_index, tmp_path):
    good = pq.read_table(audio_index).to_pylist()[:2]
    (tmp_path / "corrupt.flac").write_bytes(b"this is not audio" * 10)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(tmp_path / "short.wav", np.zeros(100, dtype=np.float32), 16000)
    rows = [
        {"sample_id": r["sample_id"], "rendition": r["rendition"], "path": str(audio_index.parent / r["path"])}
        for r in good
    ] + [
        {"sample_id": "corrupt", "rendition": "r", "path": str(tmp_path / "corrupt.flac")},
        {"sample_id": "empty", "rendition": "r", "path": str(tmp_path / "empty.wav")},
        {"sample_id": "short", "rendition": "r", "path": str(tmp_path / "short.wav")},
        {"sample_id": "missing", "rendition": "r", "path": str(tmp_path / "nope.wav")},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "index.parquet")
    out = tmp_path / "features"
    result = extract_all(tmp_path / "index.parquet", out, progress=False)
    assert result.written == 2
    rejects = {r["sample_id"]: r for r in pq.read_table(rejects_path(out, "features")).to_pylist()}
    assert set(rejects) == {"corrupt", "empty", "short", "missing"}
    assert "not decodable" in rejects["corrupt"]["reason"]
    assert "empty" in rejects["empty"]["reason"]
    assert "shorter than one" in rejects["short"]["reason"]
    assert "not found" in rejects["missing"]["reason"]
    assert all(r["field"] == "audio" and r["stage"] == "features" for r in rejects.values())


def test_resume_skips_done_clips_and_refuses_other_config(audio_index, tmp_path):
    out = tmp_path / "features"
    first = extract_all(audio_index, out, FeatureConfig(n_mels=40), progress=False)
    again = extract_all(audio_index, out, FeatureConfig(n_mels=40), progress=False)
    assert again.written == 0 and again.skipped == first.written
    with pytest.raises(ValueError, match="feature config"):
        extract_all(audio_index, out, FeatureConfig(n_mels=80), progress=False)
    redo = extract_all(audio_index, out, FeatureConfig(n_mels=80), overwrite=True, progress=False)
    assert redo.written == first.written and feature_config_of(out).n_mels == 80


def test_whisper_features_match_the_extractor_and_the_encoder_restores_its_padding(audio_index, tmp_path,
                                                                                    tiny_whisper):  # fmt: skip
    from transformers import WhisperFeatureExtractor

    from pipeline.features import load_audio
    from student.model import WhisperEncoder

    cfg = FeatureConfig(n_mels=40, kind="whisper")
    result = extract_all(audio_index, tmp_path / "w", cfg, progress=False)
    assert result.written > 0 and result.rejects.num_rows == 0 and feature_config_of(tmp_path / "w") == cfg
    stored = load_features(tmp_path / "w")
    reference = WhisperFeatureExtractor(feature_size=40)
    encoder = WhisperEncoder(str(tiny_whisper), n_mels=40)
    for r in pq.read_table(audio_index).to_pylist()[:4]:
        wave = load_audio(Path(audio_index).parent / r["path"], 16000).numpy()
        ref = reference(wave, sampling_rate=16000, return_tensors="np")["input_features"][0]  # (40, 3000)
        feats = stored[(r["sample_id"], r["rendition"], r["turn"])].astype(np.float32)
        n = feats.shape[0]
        assert 0 < n < 3000 and n == len(wave) // 160
        np.testing.assert_allclose(feats[:-1].T, ref[:, : n - 1], atol=2e-3)  # float16 storage
        padded = encoder.pad_to_window(torch.from_numpy(feats)[None], torch.tensor([n]))[0].numpy()
        np.testing.assert_allclose(padded[:, n:], ref[:, n:], atol=2e-3)
    # a config change is refused, not mixed into the same directory
    with pytest.raises(ValueError, match="feature config"):
        extract_all(audio_index, tmp_path / "w", FeatureConfig(n_mels=40), progress=False)
