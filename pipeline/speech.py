"""Text-to-speech of every sample's prompt: the spoken queries of the S->T channel.

    python -m pipeline.speech                                  # espeak-ng, 1 rendition a sample
    python -m pipeline.speech --voices en-us,en-gb --rates 150,180 --per-sample 2

Each rendition (a voice at a speaking rate, id "voice@rate") of a sample is one
16 kHz mono FLAC file under the audio directory; index.parquet lists them
(sample_id, rendition, path, duration). Re-running skips audio that exists; a
sample whose synthesis fails is recorded in data/rejects/speech.parquet and the rest go on.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from pipeline import schemas
from pipeline.errors import UserError, cli
from pipeline.parquet_io import reject, rejects_path, rejects_table, write_table_atomic
from pipeline.samples import load_samples

SAMPLE_RATE = 16_000
INDEX_FILE = "index.parquet"
# espeak-ng's English accents, and its voice variants: other speakers' timbre (+m1..+m7, +f1..+f5, +klatt).
# British English is "en": espeak-ng 1.51 ignores a variant after "en-gb" ("en-gb+f2" is "en-gb"), silently.
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5", "+klatt")


def voice_grid(accents: tuple[str, ...] = ACCENTS, variants: tuple[str, ...] = VARIANTS) -> tuple[str, ...]:
    """Every accent in every variant: espeak-ng voice names such as `en-gb-x-rp+f2`."""
    return tuple(a + v for a in accents for v in variants)


# The training speech's voices: all 98 of the grid, one drawn per clip (synthesis costs the same as with 4). The
# demo's student, trained on 4 voices, answered 18% of the questions spoken in a voice it never heard (en-029);
# on these 98 (and 800 alignment steps instead of 400), 49% (README, "Hearing voices it never heard").
DEFAULT_VOICES = voice_grid()
DEFAULT_RATES = (150, 175)


class SynthesisError(RuntimeError):
    """The backend could not render a text; the message says why."""


class TTSBackend(Protocol):
    name: str
    default_voices: tuple[str, ...]  # what synthesize_all speaks in when given no voices

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, int]:
        """Mono float32 waveform in [-1, 1] and its sample rate."""
        ...


class EspeakNG:
    """espeak-ng (Debian package `espeak-ng`) through its command line."""

    name = "espeak-ng"
    default_voices = DEFAULT_VOICES

    def __init__(self, executable: str = "espeak-ng", timeout_s: float = 60.0):
        path = shutil.which(executable)
        if path is None:
            raise SynthesisError(
                f"{executable!r} not found on PATH: install it (Debian/Ubuntu: `apt-get install -y espeak-ng`, "
                "or run `make demo`, which installs it)"
            )
        self.executable = path
        self.timeout_s = timeout_s

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, int]:
        # Text goes through stdin so that a prompt starting with "-" is not an option.
        out = _run_synthesizer(self.name, [self.executable, "-v", voice, "-s", str(rate_wpm), "--stdout"],
                               self.timeout_s, stdin=text.encode())  # fmt: skip
        return _read_wave(self.name, io.BytesIO(out))


class Flite:
    """CMU Flite (Debian package `flite`): another synthesizer than espeak-ng (diphone and clustergen voices, CMU
    pronunciations), for speech in voices espeak-ng has nothing like, e.g. a held-out synthesizer's eval set."""

    name = "flite"
    default_voices = ("awb", "kal16", "rms", "slt")  # awb_time speaks only times of day; kal is kal16 at 8 kHz
    NATURAL_WPM = 175  # the rate flite speaks at by default; other rates stretch every duration by 175 / rate

    def __init__(self, executable: str = "flite", timeout_s: float = 60.0):
        path = shutil.which(executable)
        if path is None:
            raise SynthesisError(f"{executable!r} not found on PATH: install it (Debian/Ubuntu: "
                                 f"`apt-get install -y flite`)")  # fmt: skip
        self.executable = path
        self.timeout_s = timeout_s
        listed = subprocess.run([path, "-lv"], capture_output=True, text=True, timeout=timeout_s).stdout
        self.voices = tuple(listed.split(":", 1)[-1].split())

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, int]:
        # flite speaks an unknown voice name in its default voice without a word: refuse it instead
        if voice not in self.voices:
            raise SynthesisError(f"flite has no voice {voice!r}; it has {', '.join(self.voices)}")
        with tempfile.TemporaryDirectory() as tmp:
            txt, wav = Path(tmp) / "prompt.txt", Path(tmp) / "speech.wav"
            txt.write_text(text)  # a file, so that a prompt starting with "-" is not an option
            _run_synthesizer(self.name, [self.executable, "-voice", voice, "--setf",
                                         f"duration_stretch={self.NATURAL_WPM / rate_wpm:.4f}", "-f", str(txt),
                                         "-o", str(wav)], self.timeout_s)  # fmt: skip
            return _read_wave(self.name, wav)


def _run_synthesizer(name: str, argv: list[str], timeout_s: float, stdin: bytes | None = None) -> bytes:
    """A synthesizer's command line run to completion: its stdout, or SynthesisError saying why not."""
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise SynthesisError(f"{name} timed out after {timeout_s}s") from exc
    if proc.returncode != 0:
        raise SynthesisError(f"{name} exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _read_wave(name: str, source) -> tuple[np.ndarray, int]:
    """(mono float32 waveform, sample rate) of a synthesizer's audio (a path or a file object)."""
    try:
        wave, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - any decode failure (a missing file included) is a synthesis failure
        raise SynthesisError(f"{name} output is not decodable audio ({exc})") from exc
    return wave.mean(axis=1), sr


BACKENDS = {"espeak-ng": EspeakNG, "flite": Flite}


@dataclass(frozen=True)
class Rendition:
    voice: str
    rate_wpm: int

    @property
    def id(self) -> str:
        return f"{self.voice}@{self.rate_wpm}"


def renditions_for(sample_id: str, grid: list[Rendition], per_sample: int) -> list[Rendition]:
    """`per_sample` distinct renditions, spread over the grid by a hash of the id."""
    per_sample = min(per_sample, len(grid))
    start = int(hashlib.sha1(sample_id.encode()).hexdigest()[:8], 16) % len(grid)
    return [grid[(start + i) % len(grid)] for i in range(per_sample)]


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def audio_relpath(sample_id: str, rendition: Rendition) -> str:
    """Relative path of one rendition's file; file-system safe for any sample id."""
    digest = hashlib.sha1(sample_id.encode()).hexdigest()
    stem = _SAFE.sub("_", sample_id)[:80]
    if stem != sample_id:
        stem = f"{stem}-{digest[:10]}"
    return f"{_SAFE.sub('_', rendition.id)}/{digest[:2]}/{stem}.flac"


def write_audio_atomic(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        sf.write(tmp, wave, sample_rate, format="FLAC", subtype="PCM_16")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_16k(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return wave
    return AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), sample_rate, SAMPLE_RATE).numpy()


@dataclass
class SpeechResult:
    index: pa.Table
    rejects: pa.Table
    synthesized: int
    skipped: int


def synthesize_all(
    samples_dir: Path = schemas.SAMPLES_DIR,
    audio_dir: Path = schemas.AUDIO_DIR,
    backend: TTSBackend | None = None,
    voices: tuple[str, ...] | None = None,
    rates: tuple[int, ...] = DEFAULT_RATES,
    per_sample: int = 1,
    jobs: int = os.cpu_count() or 1,
    progress: bool = True,
    split: str | None = None,
) -> SpeechResult:
    """Speak every sample's prompt (or only those of `split`) in `per_sample` renditions of voices x rates."""
    backend = backend or EspeakNG()
    voices = backend.default_voices if voices is None else voices
    unknown = [v for v in voices if v not in getattr(backend, "voices", voices)]
    if unknown:
        raise UserError(f"{backend.name} has no voice(s) {', '.join(unknown)}; it has {', '.join(backend.voices)}")
    audio_dir = Path(audio_dir)
    samples = load_samples(samples_dir, split).select(["sample_id", "prompt"]).to_pylist()
    grid = [Rendition(v, r) for v in voices for r in rates]
    if not grid:
        raise UserError("no renditions: give at least one --voices entry and one --rates entry")
    work = [(s, r) for s in samples for r in renditions_for(s["sample_id"], grid, per_sample)]

    def one(item):
        sample, rend = item
        rel = audio_relpath(sample["sample_id"], rend)
        path = audio_dir / rel
        if path.exists():
            info = sf.info(path)
            return ("skipped", sample, rend, rel, info.frames / info.samplerate)
        try:
            wave, sr = backend.synthesize(sample["prompt"], rend.voice, rend.rate_wpm)
            wave = to_16k(wave, sr)
            if wave.size == 0 or not np.any(wave):
                raise SynthesisError("synthesized audio is empty (silent); is the prompt speakable text?")
            write_audio_atomic(path, wave, SAMPLE_RATE)
        except SynthesisError as exc:
            return ("rejected", sample, rend, str(exc), None)
        return ("synthesized", sample, rend, rel, wave.size / SAMPLE_RATE)

    index_rows, rejected, counts = [], [], {"synthesized": 0, "skipped": 0, "rejected": 0}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for status, sample, rend, detail, duration in tqdm(
            pool.map(one, work), total=len(work), desc="speech", unit="clip", disable=not progress
        ):
            counts[status] += 1
            if status == "rejected":
                rejected.append(reject("speech", "prompt", detail, sample_id=sample["sample_id"], rendition=rend.id))
                continue
            index_rows.append(
                {
                    "sample_id": sample["sample_id"],
                    "rendition": rend.id,
                    "voice": rend.voice,
                    "rate_wpm": rend.rate_wpm,
                    "path": detail,
                    "duration_s": float(duration),
                    "sample_rate": SAMPLE_RATE,
                }
            )
    schema = schemas.with_metadata(
        schemas.AUDIO_INDEX_SCHEMA, "audio_index", schemas.AUDIO_INDEX_VERSION, {"tts_backend": backend.name}
    )
    index = pa.Table.from_pylist(index_rows, schema=schema)
    rejects = rejects_table(rejected)
    write_table_atomic(index, audio_dir / INDEX_FILE)
    write_table_atomic(rejects, rejects_path(audio_dir, "speech"))
    return SpeechResult(index, rejects, counts["synthesized"], counts["skipped"])


def _csv(kind):
    return lambda text: tuple(kind(x.strip()) for x in text.split(",") if x.strip())


@cli("pipeline.speech")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, default=schemas.SAMPLES_DIR, help="samples directory")
    parser.add_argument("--out", type=Path, default=schemas.AUDIO_DIR, help="audio directory")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="espeak-ng")
    parser.add_argument("--voices", type=_csv(str), default=None,
                        help="comma-separated voices, one drawn per clip (default: espeak-ng's 7 English accents x "
                             "14 variants; flite's awb,kal16,rms,slt)")  # fmt: skip
    parser.add_argument("--rates", type=_csv(int), default=DEFAULT_RATES, help="comma-separated words/minute")
    parser.add_argument("--per-sample", type=int, default=1, help="renditions per sample")
    parser.add_argument("--split", default=None, help="only the samples of this split (e.g. eval, for a held-out "
                                                      "voice)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel synthesis processes")
    args = parser.parse_args(argv)
    result = synthesize_all(
        args.samples, args.out, BACKENDS[args.backend](), args.voices, args.rates, args.per_sample, args.jobs,
        split=args.split,
    )
    hours = sum(result.index["duration_s"].to_pylist()) / 3600
    print(
        f"speech: {result.index.num_rows} clips ({result.synthesized} synthesized, {result.skipped} already there, "
        f"{hours:.2f} h), {result.rejects.num_rows} rejected -> {args.out / INDEX_FILE}"
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
