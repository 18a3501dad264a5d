"""Text-to-speech of every sample's user turn(s): the spoken queries of the S->T channel.

    python -m pipeline.speech                                  # espeak-ng, 1 rendition a sample
    python -m pipeline.speech --voices en-us,en-gb --rates 150,180 --per-sample 2
    python -m pipeline.speech --speak all-user                 # every user turn of a conversation, not the last only
    python -m pipeline.speech --backend vits --tts-model kakao-enterprise/vits-vctk   # 109 human speakers (GPU)

What is spoken: a sample's last user turn (its prompt), or with `--speak all-user`
every user turn of a conversation; a system prompt and the assistant turns are
never spoken (they stay text in both channels). Each rendition (a voice at a
speaking rate, id "voice@rate") of a spoken turn is one 16 kHz mono FLAC file
under the audio directory; index.parquet lists them (sample_id, rendition, turn,
path, duration), and a sample's turns share its rendition (one speaker per
conversation). Re-running skips audio that exists; a turn whose synthesis fails
is recorded in data/rejects/speech.parquet (the sample's other turns in that
rendition are left out of the index: channel S hears all its spoken turns or none)
and the rest go on.

With `--perturb-train FRACTION` a seeded share of the train split's clips is perturbed after synthesis, as the toy
encoder's corpus is (pipeline.augment: speed, white noise, a training room, dither; never a vocal-tract warp, which
is a feature-side change, and never pipeline.conditions' held-out noise, rooms or telephone band): the student's
alignment then hears other rooms than the synthesizer's clean output. A perturbed clip's file name carries a digest
of its draw and the index its `perturbation`; the eval split is never perturbed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
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

from pipeline import augment, schemas
from pipeline.audio import INDEX_FILE, SAMPLE_RATE
from pipeline.chat import SPEAK, conversation, spoken_turns
from pipeline.config import listed, opt, parse_config
from pipeline.errors import UserError, cli
from pipeline.files import atomic_write
from pipeline.parquet_io import reject, rejects_path, rejects_table, write_table_atomic
from pipeline.samples import load_samples

# espeak-ng's English accents, and its voice variants: other speakers' timbre (+m1..+m7, +f1..+f5, +klatt).
# British English is "en": espeak-ng 1.51 ignores a variant after "en-gb" ("en-gb+f2" is "en-gb"), silently.
ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4", "+f5", "+klatt")


def voice_grid(accents: tuple[str, ...] = ACCENTS, variants: tuple[str, ...] = VARIANTS) -> tuple[str, ...]:
    """Every accent in every variant: espeak-ng voice names such as `en-gb-x-rp+f2`."""
    return tuple(a + v for a in accents for v in variants)


# The training speech's voices: all 98 of the grid, one drawn per clip (synthesis costs the same as with 4): the
# student hears only what its training speech had (docs/design.md, "How the toy student hears").
DEFAULT_VOICES = voice_grid()
DEFAULT_RATES = (150, 175)


class SynthesisError(RuntimeError):
    """The backend could not render a text; the message says why."""


class TTSBackend(Protocol):
    name: str
    default_voices: tuple[str, ...]  # what synthesize_all speaks in when given no voices
    heldout_voice: str | None  # a voice of this backend kept out of default_voices, for a never-heard eval set

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, int]:
        """Mono float32 waveform in [-1, 1] and its sample rate."""
        ...


class BatchTTSBackend(TTSBackend, Protocol):
    """A backend that renders many texts in one call (a neural model on a GPU); synthesize_all then hands it
    up to `batch_size` clips of one rendition at a time."""

    batch_size: int

    def synthesize_batch(self, texts: list[str], voice: str, rate_wpm: int) -> list[tuple[np.ndarray, int]]: ...


class EspeakNG:
    """espeak-ng (Debian package `espeak-ng`) through its command line."""

    name = program = "espeak-ng"  # program: the command line it runs (and its Debian package)
    default_voices = DEFAULT_VOICES
    heldout_voice = "en-029"  # Caribbean English: an accent of none of the default voices

    def __init__(self, executable: str = "espeak-ng", timeout_s: float = 60.0):
        self.executable = _executable(executable, "espeak-ng")
        self.timeout_s = timeout_s

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, int]:
        # Text goes through stdin so that a prompt starting with "-" is not an option.
        out = _run_synthesizer(self.name, [self.executable, "-v", voice, "-s", str(rate_wpm), "--stdout"],
                               self.timeout_s, stdin=text.encode())  # fmt: skip
        return _read_wave(self.name, io.BytesIO(out))


class Flite:
    """CMU Flite (Debian package `flite`): another synthesizer than espeak-ng (diphone and clustergen voices, CMU
    pronunciations), for speech in voices espeak-ng has nothing like, e.g. a held-out synthesizer's eval set."""

    name = program = "flite"
    default_voices = ("awb", "kal16", "rms", "slt")  # awb_time speaks only times of day; kal is kal16 at 8 kHz
    heldout_voice = None  # four voices: none to spare (a whole synthesizer never heard is the harder test)
    NATURAL_WPM = 175  # the rate flite speaks at by default; other rates stretch every duration by 175 / rate

    def __init__(self, executable: str = "flite", timeout_s: float = 60.0):
        self.executable = path = _executable(executable, "flite")
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


class Festival:
    """The Festival Speech Synthesis System (Debian package `festival`, voices in `festvox-*` packages): a third
    synthesizer, with diphone (concatenative) and HTS (statistical parametric) English voices. One `festival
    --batch` process renders a whole batch of clips (its start-up is most of a clip's cost)."""

    name = program = "festival"
    # each English voice Debian main ships, and its package (what a missing voice's set-up error names)
    VOICE_PACKAGES = {"ked_diphone": "festvox-kdlpc16k", "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
                      "kal_diphone": "festvox-kallpc16k"}  # fmt: skip
    # kal_diphone is held out of the defaults: its speaker and diphones are also Flite's kal16 (so a student trained
    # on Festival's defaults has not heard any of Flite's kal16 speaker)
    default_voices = ("ked_diphone", "cmu_us_slt_arctic_hts")
    heldout_voice = "kal_diphone"
    NATURAL_WPM = 175  # a rate stretches every duration by 175 / rate (Festival's Duration_Stretch)
    batch_size = 32

    def __init__(self, executable: str = "festival", timeout_s: float = 120.0,
                 required: tuple[str, ...] | None = None):  # fmt: skip
        self.executable = _executable(executable, "festival")
        self.timeout_s = timeout_s
        out = _run_synthesizer(self.name, [self.executable, "--pipe"], timeout_s, stdin=b"(print (voice.list))")
        self.voices = tuple(out.decode().strip().strip("()").split())
        for voice in self.default_voices + (self.heldout_voice,) if required is None else required:
            if voice not in self.voices:
                package = self.VOICE_PACKAGES.get(voice, "the festvox-* package of that voice")
                raise UserError(f"festival has no voice {voice!r} ({package}): install it (Debian/Ubuntu: `apt-get "
                                f"install -y {package}`; `make setup` does)")  # fmt: skip

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, int]:
        return self.synthesize_batch([text], voice, rate_wpm)[0]

    def synthesize_batch(self, texts: list[str], voice: str, rate_wpm: int) -> list[tuple[np.ndarray, int]]:
        if voice not in self.voices:
            raise SynthesisError(f"festival has no voice {voice!r}; it has {', '.join(self.voices)}")
        with tempfile.TemporaryDirectory() as tmp:
            wavs = [Path(tmp) / f"{i}.wav" for i in range(len(texts))]
            lines = [f"(voice_{voice})", f"(Parameter.set 'Duration_Stretch {self.NATURAL_WPM / rate_wpm:.4f})"]
            if voice.endswith("_hts"):  # an HTS voice ignores Duration_Stretch; hts_engine takes a speed rate
                lines.append(f'(set! hts_engine_params (append hts_engine_params (list (list "-r" '
                             f'{rate_wpm / self.NATURAL_WPM:.4f}))))')  # fmt: skip
            lines += [f'(utt.save.wave (utt.synth (Utterance Text "{_scheme_string(t)}")) "{w}" \'riff)'
                      for t, w in zip(texts, wavs)]  # fmt: skip
            script = Path(tmp) / "batch.scm"
            script.write_text("\n".join(lines) + "\n")
            _run_synthesizer(self.name, [self.executable, "--batch", str(script)], self.timeout_s)
            missing = [t for t, w in zip(texts, wavs) if not w.exists()]
            if missing:  # festival reports a failed utterance on stderr and goes on (exit status 0)
                raise SynthesisError(f"festival wrote no audio for {missing[0][:60]!r}")
            return [_read_wave(self.name, w) for w in wavs]


def _scheme_string(text: str) -> str:
    """A text inside a Scheme string literal (Festival's scripts); newlines become spaces."""
    return " ".join(text.replace("\\", "\\\\").replace('"', '\\"').split())


DEFAULT_VITS_MODEL = "kakao-enterprise/vits-vctk"  # VITS trained on VCTK: 109 English speakers, 22.05 kHz, MIT


class Vits:
    """A VITS text-to-speech model from transformers (`VitsModel`), e.g. kakao-enterprise/vits-vctk (109 speakers
    of VCTK, human recordings) or a facebook/mms-tts-* model (one speaker): speech that sounds like people, for a
    student that must hear people. Voices are the model's speaker ids, `spk0` ... `spk108`; the last is held out of
    the defaults. A rate scales VITS's speaking_rate by rate / 175 wpm. Each batch is seeded from its texts, so
    the same data gives the same audio. Runs on the GPU when there is one (`device`), `batch_size` clips of one
    rendition a forward; a clip shorter than its batch's longest can differ from its clip-by-clip rendering at its
    very end (the decoder's convolutions reach into the batch's padding: the last 361 samples in the test model;
    `--tts-batch 1` avoids it, at the cost of batching)."""

    NATURAL_WPM = 175

    def __init__(self, model: str = DEFAULT_VITS_MODEL, device: str = "auto", batch_size: int = 16):
        from transformers import AutoTokenizer, VitsModel

        # phonemizer warns "words count mismatch" on most prompts with punctuation (it keeps the punctuation the
        # tokenizer asks for): one line per batch, tens of thousands at scale, about nothing that changes the audio
        logging.getLogger("phonemizer").setLevel(logging.ERROR)
        if batch_size < 1:
            raise UserError(f"--tts-batch must be >= 1, got {batch_size}")
        try:
            self.model = VitsModel.from_pretrained(model)
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as exc:
            raise UserError(f"--tts-model {model}: not a loadable VITS model ({_first_line(exc)}); give a Hugging "
                            f"Face id of one (e.g. {DEFAULT_VITS_MODEL}, facebook/mms-tts-eng) or its local "
                            f"directory") from exc  # fmt: skip
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model.to(self.device).eval()
        self.name = f"vits:{model}"
        self.batch_size = batch_size
        self.sample_rate = int(self.model.config.sampling_rate)
        self.voices, self.heldout_voice = self.speakers(int(self.model.config.num_speakers))
        self.default_voices = tuple(v for v in self.voices if v != self.heldout_voice)
        self._lock = threading.Lock()  # one batch at a time: the model is one, and seeding is global
        # tokens that say something: not special (blank, unknown), not punctuation alone
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        self._speakable = {i for i, tok in enumerate(tokens)
                           if i not in self.tokenizer.all_special_ids and any(c.isalnum() for c in tok)}  # fmt: skip

    @staticmethod
    def speakers(n: int) -> tuple[tuple[str, ...], str | None]:
        """The voices of a model of n speakers, and the one held out of the defaults (none if n is 1)."""
        voices = tuple(f"spk{i}" for i in range(n))
        return voices, (voices[-1] if n > 1 else None)

    def _speaker(self, voice: str) -> int | None:
        if voice not in self.voices:
            raise SynthesisError(f"{self.name} has no voice {voice!r}; it has spk0 ... spk{len(self.voices) - 1}")
        return int(voice[3:]) if len(self.voices) > 1 else None

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, int]:
        return self.synthesize_batch([text], voice, rate_wpm)[0]

    def synthesize_batch(self, texts: list[str], voice: str, rate_wpm: int) -> list[tuple[np.ndarray, int]]:
        speaker = self._speaker(voice)
        seed = int(hashlib.sha1("\n".join([voice, str(rate_wpm), *texts]).encode()).hexdigest()[:8], 16)
        # Under the lock, tokenizing too: a phonemizing tokenizer drives libespeak-ng, which is not thread-safe
        # (two threads at once gave one of them another text's phonemes).
        with self._lock:
            ids = [self.tokenizer(t).input_ids for t in texts]
            empty = [t for t, i in zip(texts, ids) if not self._speakable.intersection(i)]
            if empty:  # synthesize_all then renders the batch clip by clip, to reject only this one
                raise SynthesisError(f"{self.name}: nothing speakable in {empty[0][:60]!r} (punctuation or unknown "
                                     f"characters alone, after its tokenizer's normalization)")  # fmt: skip
            width, pad = max(len(i) for i in ids), self.tokenizer.pad_token_id or 0
            input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=self.device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=self.device)
            with torch.inference_mode(), torch.random.fork_rng(
                devices=[self.device] if self.device.type == "cuda" else []
            ):
                torch.manual_seed(seed)
                out = self.model(input_ids=input_ids, attention_mask=mask, speaker_id=speaker,
                                 speaking_rate=rate_wpm / self.NATURAL_WPM)  # fmt: skip
        waves = out.waveform.float().cpu().numpy()
        return [(waves[b, : int(n)].copy(), self.sample_rate) for b, n in enumerate(out.sequence_lengths.tolist())]


def _not_found(executable: str, package: str) -> str:
    return (f"{executable!r} ({package}) not found on PATH: install it (Debian/Ubuntu: `apt-get install -y "
            f"{package}`; `make setup` does)")  # fmt: skip


def missing_synthesizer(name: str) -> str | None:
    """Why a command-line backend (one with a `program`; each of a mixed one's) cannot run here, or None."""
    for part in name.split("+"):
        program = getattr(BACKENDS.get(part), "program", None)
        if program and not shutil.which(program):
            return _not_found(program, program)
    return None


def _executable(executable: str, package: str) -> str:
    path = shutil.which(executable)
    if path is None:  # a set-up problem, not a bad clip: one line, and no retrying
        raise UserError(_not_found(executable, package))
    return path


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


class Mixed:
    """Several synthesizers as one backend (`--tts espeak-ng+festival`): the training speech of a student that must
    hear more than one synthesizer. Voices of the first keep their names; the others' are qualified by their
    synthesizer (`festival:ked_diphone`). Each clip is spoken by one synthesizer, the synthesizers in turn by a hash
    of the sample (renditions_for), so each has an equal share of the clips whatever its number of voices."""

    def __init__(self, backends: list[TTSBackend]):
        if len(backends) < 2 or len({b.name for b in backends}) < len(backends):
            raise UserError("a mixed backend takes two or more different synthesizers, e.g. espeak-ng+festival")
        self.backends = {b.name: b for b in backends}
        self.first = backends[0]
        self.name = "+".join(b.name for b in backends)
        self.default_voices = tuple(self.qualify(b.name, v) for b in backends for v in b.default_voices)
        self.heldout_voice = self.first.heldout_voice
        self.batch_size = max(int(getattr(b, "batch_size", 1)) for b in backends)

    def unknown_voices(self, voices) -> list[str]:
        """The voices no synthesizer of the mix has (one without a voice list, espeak-ng, takes any name)."""
        out = []
        for voice in voices:
            family, name = split_voice(voice)
            backend = self.backends.get(family or self.first.name)
            if backend is None or name not in getattr(backend, "voices", (name,)):
                out.append(voice)
        return out

    def qualify(self, family: str, voice: str) -> str:
        return voice if family == self.first.name else f"{family}:{voice}"

    def resolve(self, voice: str) -> tuple[TTSBackend, str]:
        family, name = split_voice(voice)
        backend = self.backends.get(family or self.first.name)
        if backend is None:
            raise SynthesisError(f"{self.name} has no synthesizer {family!r} (voice {voice!r})")
        return backend, name

    def synthesize(self, text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, int]:
        backend, name = self.resolve(voice)
        return backend.synthesize(text, name, rate_wpm)

    def synthesize_batch(self, texts: list[str], voice: str, rate_wpm: int) -> list[tuple[np.ndarray, int]]:
        backend, name = self.resolve(voice)
        if hasattr(backend, "synthesize_batch"):
            return backend.synthesize_batch(texts, name, rate_wpm)
        return [backend.synthesize(t, name, rate_wpm) for t in texts]


BACKENDS = {"espeak-ng": EspeakNG, "festival": Festival, "flite": Flite, "vits": Vits}


def split_voice(voice: str) -> tuple[str, str]:
    """(synthesizer, voice) of a (possibly qualified) voice of a mixed backend; '' for the first one's."""
    family, _, name = voice.rpartition(":")
    return family, name


def by_synthesizer(items: list, voice=lambda item: item) -> list[list]:
    """`items` (voices, or what `voice` reads one from) grouped by their synthesizer, in order of first appearance:
    what gives each synthesizer of a mix an equal share of the clips."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(split_voice(voice(item))[0], []).append(item)
    return list(groups.values())


def families_of(name: str) -> tuple[str, ...]:
    """The synthesizers of a --tts name (`espeak-ng+festival` -> both); refuses an unknown one."""
    parts = tuple(name.split("+"))
    unknown = [p for p in parts if p not in BACKENDS]
    if unknown or not name:
        raise UserError(f"unknown text-to-speech backend {unknown[0] if unknown else name!r}: use one of "
                        f"{', '.join(sorted(BACKENDS))}, or several joined by '+' (e.g. espeak-ng+festival)")  # fmt: skip
    if len(parts) > 1 and "vits" in parts:
        raise UserError("vits speaks alone: a mixed backend takes command-line synthesizers (espeak-ng, festival, "
                        "flite)")  # fmt: skip
    return parts


def heldout_voice_of(name: str, model: str | None = None) -> str | None:
    """A backend's own held-out voice (see TTSBackend) without loading it: a VITS model's config alone."""
    if name != "vits":
        return BACKENDS[families_of(name)[0]].heldout_voice  # a mixed backend's: its first synthesizer's
    from transformers import AutoConfig

    try:
        n = int(AutoConfig.from_pretrained(model or DEFAULT_VITS_MODEL).num_speakers)
    except (OSError, ValueError) as exc:
        raise UserError(f"--tts-model {model or DEFAULT_VITS_MODEL}: no VITS config there ({_first_line(exc)}); "
                        f"give a Hugging Face id of a VITS model or its local directory") from exc  # fmt: skip
    return Vits.speakers(n)[1]


def make_backend(name: str, model: str | None = None, device: str = "auto", batch_size: int = 16) -> TTSBackend:
    """A backend by its --backend name; `model` (a VITS model id or directory), `device` and `batch_size` are
    VITS's."""
    parts = families_of(name)
    if name == "vits":
        return Vits(model or DEFAULT_VITS_MODEL, device, batch_size)
    if model:
        raise UserError(f"--tts-model is for the vits backend; {name} takes voices (--voices)")
    if len(parts) > 1:
        return Mixed([BACKENDS[p]() for p in parts])
    return BACKENDS[name]()


@dataclass(frozen=True)
class Rendition:
    voice: str
    rate_wpm: int

    @property
    def id(self) -> str:
        return f"{self.voice}@{self.rate_wpm}"


def renditions_for(sample_id: str, grid: list[Rendition], per_sample: int) -> list[Rendition]:
    """`per_sample` distinct renditions, spread over the grid by a hash of the id. A grid of several synthesizers
    (a mixed backend's) gives each synthesizer an equal share: the renditions take the synthesizers in turn."""
    h = int(hashlib.sha1(sample_id.encode()).hexdigest()[:8], 16)
    groups = by_synthesizer(grid, lambda rend: rend.voice)
    if len(groups) == 1:
        per_sample = min(per_sample, len(grid))
        return [grid[(h % len(grid) + i) % len(grid)] for i in range(per_sample)]
    out: list[Rendition] = []
    for i in range(min(per_sample, len(grid))):
        group = groups[(h + i) % len(groups)]
        out.append(group[(h // len(groups) + i // len(groups)) % len(group)])
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class TrainPerturbation:
    """Which clips of one split are perturbed after synthesis, and how: a `fraction` of them, each clip's draw
    (pipeline.augment.draw, its vocal-tract warp left at 1) seeded by (seed, sample, rendition, turn), so the same
    samples and seed give the same audio in any order, process or re-run."""

    fraction: float = 0.0
    seed: int = 0
    split: str = "train"
    augment: augment.AugmentConfig = augment.AugmentConfig()

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise UserError(f"--perturb-train must be a fraction in [0, 1], got {self.fraction}")

    @staticmethod
    def _key(sample_id: str, rendition: Rendition, turn: int) -> str:
        return f"speech\0{sample_id}\0{rendition.id}\0{turn}"

    def draw(self, sample_id: str, split: str | None, rendition: Rendition, turn: int) -> augment.Perturbation | None:
        """The clip's perturbation, or None: a clip of another split, or one of the clips left clean."""
        if self.fraction <= 0.0 or split != self.split:
            return None
        rng = augment.rng_for(self._key(sample_id, rendition, turn), self.seed)
        if rng.random() >= self.fraction:
            return None
        return dataclasses.replace(augment.draw(self.augment, rng), vtln_warp=1.0)

    def apply(self, wave: np.ndarray, p: augment.Perturbation, sample_id: str, rendition: Rendition,
              turn: int) -> np.ndarray:  # fmt: skip
        """The clip under its draw; the noise (and room) seeded by the clip's key too."""
        return augment.perturb(wave, p, augment.rng_for("noise\0" + self._key(sample_id, rendition, turn), self.seed))


def describe_perturbation(p: augment.Perturbation | None) -> str | None:
    """A draw as the audio index's `perturbation` value (JSON; None: clean)."""
    return None if p is None else json.dumps(dataclasses.asdict(p), sort_keys=True)


_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def audio_relpath(sample_id: str, rendition: Rendition, turn: int = 0, perturbation: str | None = None) -> str:
    """Relative path of one rendition's file of a sample's spoken turn (turn 0, a plain sample's only user turn,
    has no suffix; a perturbed clip's name carries a digest of its draw, so clean and perturbed audio never share a
    file); file-system safe for any sample id."""
    digest = hashlib.sha1(sample_id.encode()).hexdigest()
    stem = _SAFE.sub("_", sample_id)[:80]
    if stem != sample_id:
        stem = f"{stem}-{digest[:10]}"
    suffix = f".t{turn}" if turn else ""
    if perturbation is not None:
        suffix += f".p{hashlib.sha1(perturbation.encode()).hexdigest()[:10]}"
    return f"{_SAFE.sub('_', rendition.id)}/{digest[:2]}/{stem}{suffix}.flac"


@dataclass(frozen=True)
class Utterance:
    """One spoken user turn of a sample: what the synthesizer is given."""

    sample_id: str
    turn: int  # the turn's index in the sample's conversation
    text: str
    field: str  # the sample field it comes from (prompt, or messages[i].content): what a reject names


def utterances(sample: dict, speak: str = "last-user") -> list[Utterance]:
    """The user turns of a sample a spoken channel hears (pipeline.chat.spoken_turns), never a system prompt or an
    assistant turn."""
    turns = conversation(sample)
    chat = bool(sample.get("messages"))
    return [Utterance(sample["sample_id"], i, turns[i]["content"], f"messages[{i}].content" if chat else "prompt")
            for i in spoken_turns(turns, speak)]  # fmt: skip


def write_audio_atomic(path: Path, wave: np.ndarray, sample_rate: int) -> None:
    with atomic_write(path) as tmp:
        sf.write(tmp, wave, sample_rate, format="FLAC", subtype="PCM_16")


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

    @property
    def perturbed(self) -> int:
        """Clips of the index perturbed after synthesis (--perturb-train)."""
        return self.index["perturbation"].drop_null().length()


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
    speak: str = "last-user",
    perturb: TrainPerturbation = TrainPerturbation(),
) -> SpeechResult:
    """Speak every sample's user turn(s) (`speak`: the last, or all-user) of every sample (or only those of `split`)
    in `per_sample` renditions of voices x rates; `perturb` perturbs a share of one split's clips after synthesis."""
    backend = backend or EspeakNG()
    voices = backend.default_voices if voices is None else voices
    if isinstance(backend, Mixed):
        unknown = backend.unknown_voices(voices)
    else:
        unknown = [v for v in voices if v not in getattr(backend, "voices", voices)]
    if unknown:
        known = getattr(backend, "voices", backend.default_voices)
        raise UserError(f"{backend.name} has no voice(s) {', '.join(unknown)}; it has {', '.join(known)}")
    if speak not in SPEAK:
        raise UserError(f"--speak {speak!r} is not one of {', '.join(SPEAK)}")
    audio_dir = Path(audio_dir)
    samples = load_samples(samples_dir, split).select(["sample_id", "split", "prompt", "response", "messages"])
    samples = samples.to_pylist()
    split_of = {s["sample_id"]: s["split"] for s in samples}
    grid = [Rendition(v, r) for v in voices for r in rates]
    if not grid:
        raise UserError("no renditions: give at least one --voices entry and one --rates entry")
    # every spoken turn of a sample in each of the sample's renditions
    work = [(u, r) for s in samples for r in renditions_for(s["sample_id"], grid, per_sample)
            for u in utterances(s, speak)]  # fmt: skip
    # A batching backend gets up to batch_size clips of one rendition per call; the others one clip per call.
    batch = max(1, int(getattr(backend, "batch_size", 1)))
    by_rendition: dict[Rendition, list[Utterance]] = {}
    for u, rend in work:
        by_rendition.setdefault(rend, []).append(u)
    if batch > 1:  # texts of like length together: less padding to compute, and to reach into (see Vits)
        by_rendition = {rend: sorted(group, key=lambda u: len(u.text)) for rend, group in by_rendition.items()}
    units = [(rend, group[i : i + batch]) for rend, group in by_rendition.items() for i in range(0, len(group), batch)]

    def render(texts: list[str], rend: Rendition) -> list:
        """Each text's (wave at 16 kHz) or SynthesisError; a failed batch is retried clip by clip to tell which."""
        try:
            if len(texts) == 1:
                return [backend.synthesize(texts[0], rend.voice, rend.rate_wpm)]
            return backend.synthesize_batch(texts, rend.voice, rend.rate_wpm)
        except SynthesisError as exc:
            if len(texts) == 1:
                return [exc]
            return [r for t in texts for r in render([t], rend)]

    def one(unit):
        rend, group = unit
        results, todo = {}, []
        for u in group:
            p = perturb.draw(u.sample_id, split_of[u.sample_id], rend, u.turn)
            rel = audio_relpath(u.sample_id, rend, u.turn, describe_perturbation(p))
            if (audio_dir / rel).exists():
                info = sf.info(audio_dir / rel)
                results[u] = ("skipped", u, rend, rel, info.frames / info.samplerate, p)
            else:
                todo.append((u, rel, p))
        rendered = render([u.text for u, _, _ in todo], rend) if todo else []
        for (u, rel, p), out in zip(todo, rendered, strict=True):
            try:
                if isinstance(out, SynthesisError):
                    raise out
                wave = to_16k(*out)
                if wave.size == 0 or not np.any(wave):
                    raise SynthesisError("synthesized audio is empty (silent); is the prompt speakable text?")
                if p is not None:
                    wave = perturb.apply(wave, p, u.sample_id, rend, u.turn)
                write_audio_atomic(audio_dir / rel, wave, SAMPLE_RATE)
            except SynthesisError as exc:
                results[u] = ("rejected", u, rend, str(exc), None, p)
                continue
            results[u] = ("synthesized", u, rend, rel, wave.size / SAMPLE_RATE, p)
        return [results[u] for u in group]

    done, rejected, counts = {}, [], {"synthesized": 0, "skipped": 0, "rejected": 0}
    failed: set[tuple[str, str]] = set()  # (sample, rendition) with a turn that could not be spoken
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, tqdm(
        total=len(work), desc="speech", unit="clip", disable=not progress
    ) as bar:
        for unit_results in pool.map(one, units):
            bar.update(len(unit_results))
            for status, u, rend, detail, duration, p in unit_results:
                counts[status] += 1
                if status == "rejected":
                    rejected.append(reject("speech", u.field, detail, sample_id=u.sample_id, rendition=rend.id))
                    failed.add((u.sample_id, rend.id))
                    continue
                done[(u, rend)] = {"sample_id": u.sample_id, "rendition": rend.id, "turn": u.turn, "voice": rend.voice,
                                   "rate_wpm": rend.rate_wpm, "path": detail, "duration_s": float(duration),
                                   "sample_rate": SAMPLE_RATE, "perturbation": describe_perturbation(p)}  # fmt: skip
    # the samples' order, as before; a sample's turns in order; none of a (sample, rendition) that lost a turn
    index_rows = [done[(u, rend)] for u, rend in work if (u, rend) in done and (u.sample_id, rend.id) not in failed]
    schema = schemas.with_metadata(schemas.AUDIO_INDEX_SCHEMA, "audio_index", schemas.AUDIO_INDEX_VERSION,
                                   {"tts_backend": backend.name, "speak": speak})  # fmt: skip
    index = pa.Table.from_pylist(index_rows, schema=schema)
    rejects = rejects_table(rejected)
    write_table_atomic(index, audio_dir / INDEX_FILE)
    write_table_atomic(rejects, rejects_path(audio_dir, "speech"))
    return SpeechResult(index, rejects, counts["synthesized"], counts["skipped"])


@dataclass
class SpeechConfig:
    """`python -m pipeline.speech`: which samples, which synthesizer, which voices and rates."""

    samples: str = opt(str(schemas.SAMPLES_DIR), "samples directory")
    out: str = opt(str(schemas.AUDIO_DIR), "audio directory")
    backend: str = opt("espeak-ng", f"the synthesizer ({', '.join(sorted(BACKENDS))}), or several joined by '+' "
                                    f"(espeak-ng+festival: each clip spoken by one, in equal shares)")  # fmt: skip
    voices: list[str] = listed((), "voices, one drawn per clip (default: the backend's own: espeak-ng's 7 English "
                                   "accents x 14 variants; festival's ked_diphone,cmu_us_slt_arctic_hts; flite's "
                                   "awb,kal16,rms,slt; a mixed one's qualified: festival:ked_diphone; vits: every "
                                   "speaker spk0, spk1, ... but the last)")  # fmt: skip
    tts_model: str | None = opt(None, f"vits: a Hugging Face id or directory of a VITS model (default "
                                      f"{DEFAULT_VITS_MODEL})")  # fmt: skip
    tts_device: str = opt("auto", "vits: cuda, cpu, or auto (cuda when there is one)")
    tts_batch: int = opt(16, "vits: clips per forward")
    rates: list[int] = listed(DEFAULT_RATES, "speaking rates, words per minute")
    per_sample: int = opt(1, "renditions per sample")
    split: str | None = opt(None, "only the samples of this split (e.g. eval, for a held-out voice)")
    speak: str = opt("last-user", "which user turns of a conversation are spoken: the last (a plain sample's "
                                  "prompt), or every one; system prompts and assistant turns never are", SPEAK)  # fmt: skip
    jobs: int = opt(os.cpu_count() or 1, "parallel synthesis threads")
    perturb_train: float = opt(0.0, "share of the train split's clips perturbed after synthesis (speed, white noise, "
                                    "a training room, dither: pipeline.augment); 0: none")  # fmt: skip
    perturb_seed: int = opt(0, "seeds which clips --perturb-train perturbs and how")


@cli("pipeline.speech")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SpeechConfig, argv, description=__doc__)
    backend = make_backend(cfg.backend, cfg.tts_model, cfg.tts_device, cfg.tts_batch)
    result = synthesize_all(Path(cfg.samples), Path(cfg.out), backend, tuple(cfg.voices) or None, tuple(cfg.rates),
                            cfg.per_sample, cfg.jobs, split=cfg.split, speak=cfg.speak,
                            perturb=TrainPerturbation(cfg.perturb_train, cfg.perturb_seed))  # fmt: skip
    hours = sum(result.index["duration_s"].to_pylist()) / 3600
    print(
        f"speech: {result.index.num_rows} clips ({result.synthesized} synthesized, {result.skipped} already there, "
        f"{result.perturbed} perturbed, {hours:.2f} h), {result.rejects.num_rows} rejected -> {Path(cfg.out) / INDEX_FILE}"
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
