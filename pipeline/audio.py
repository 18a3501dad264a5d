"""Audio clips as the stages read them: one file decoded to a mono 16 kHz waveform, and an audio index (the one
pipeline.speech writes, or one's own) read as a store of clips by (sample_id, rendition, turn).

`AudioStore` has the interface of pipeline.features.FeatureStore (`keys`, `voices`, `read`), so a student that runs
its own processor on the audio (a pretrained speech LLM, student/hf.py) is joined with its samples by the same
index (student.inputs.SpeechIndex) as one that reads stored features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import torch
import torchaudio.functional as AF

from pipeline import schemas
from pipeline.errors import CorruptData, InputMismatch, MissingInput

INDEX_FILE = "index.parquet"
SAMPLE_RATE = 16_000


class BadAudio(ValueError):
    """An audio file that cannot be read as speech; the message says why."""


def load_audio(path: Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform at `sample_rate`, or BadAudio saying what is wrong."""
    if not path.exists():
        raise BadAudio(f"audio file not found: {path}")
    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - any decoder error means corrupt audio
        raise BadAudio(f"not decodable audio ({type(exc).__name__}: {exc})") from exc
    if wave.shape[0] == 0:
        raise BadAudio("audio is empty (0 samples)")
    mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
    if sr != sample_rate:
        mono = AF.resample(mono, sr, sample_rate)
    return mono


def read_audio_index(index_path: Path) -> list[dict]:
    """The index's rows (sample_id, rendition, turn, voice, path resolved against the index's directory); an index
    without a voice column (one's own) gets each rendition id's voice, one without a turn column (version 1, or
    one's own) turn 0: each clip speaks its sample's one user turn."""
    table = pq.read_table(index_path)
    missing = {"sample_id", "rendition", "path"} - set(table.column_names)
    if missing:
        raise InputMismatch(f"{index_path}: audio index lacks column(s) {sorted(missing)}; it needs sample_id, "
                            f"rendition, path (and voice)")  # fmt: skip
    columns = ["sample_id", "rendition", "path"] + [c for c in ("voice", "turn") if c in table.column_names]
    rows = table.select(columns).to_pylist()
    for r in rows:
        p = Path(r["path"])
        r["path"] = p if p.is_absolute() else index_path.parent / p
        r.setdefault("voice", schemas.voice_of_rendition(r["rendition"]))
        r.setdefault("turn", 0)
    return rows


class AudioStore:
    """The clips of an audio index by position: their sample ids, renditions and voices, each read as a mono
    float32 waveform at 16 kHz (`read`), keyed by (sample_id, rendition, turn). `directory` holds index.parquet (or is the index file)."""

    def __init__(self, directory: Path | str, sample_rate: int = SAMPLE_RATE):
        path = Path(directory)
        index = path / INDEX_FILE if path.is_dir() else path
        if not index.exists():
            raise MissingInput(f"no audio index at {index}: run `python -m pipeline.speech` (or the cache-teacher "
                               f"flow) first, or pass --audio")  # fmt: skip
        self.dir, self.sample_rate = index.parent, sample_rate
        rows = read_audio_index(index)
        self.sample_ids = np.array([r["sample_id"] for r in rows], dtype=object)
        self.renditions = np.array([r["rendition"] for r in rows], dtype=object)
        self.voices = np.array([r["voice"] for r in rows], dtype=object)
        self.turns = np.array([r["turn"] for r in rows], dtype=np.int64)
        self.paths = [r["path"] for r in rows]

    def __len__(self) -> int:
        return len(self.paths)

    def keys(self):
        """(sample_id, rendition, turn) of every clip, by position."""
        return zip(self.sample_ids.tolist(), self.renditions.tolist(), self.turns.tolist())

    def read(self, i: int) -> np.ndarray:
        """Clip i: (samples,) float32 at the store's rate; CorruptData naming the file when it cannot be read."""
        try:
            return load_audio(Path(self.paths[i]), self.sample_rate).numpy()
        except BadAudio as exc:
            raise CorruptData(f"{self.paths[i]}: clip {self.sample_ids[i]!r} ({self.renditions[i]}): {exc}; run "
                              f"`python -m pipeline.speech` again to re-synthesize it (delete the file first)") from None
