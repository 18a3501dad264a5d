"""What a student run reads, opened once: the cache, the samples it names (read once per run), the speech of those
samples and the held-out speech sets.

This is the one place samples are joined with speech: `SpeechIndex` lists, per sample, its clips in a speech store
(rendition, spoken turn, position, voice), and training examples (student.data: one per rendition, with every
spoken turn of it), eval sets (student.evaluate) and the held-out checks all take their clips from it; the rule for
which clip an eval question uses (`SpeechIndex.first`: the first rendition by name, its last spoken turn) is
decided here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import schemas
from pipeline.audio import AudioStore
from pipeline.cache import CacheReader
from pipeline.errors import MissingInput
from pipeline.features import FeatureStore
from pipeline.fingerprint import content_sha256
from pipeline.samples import load_samples
from student.config import ConfigError


class Samples:
    """The samples table, read once: text, split and metadata by sample id."""

    def __init__(self, samples_dir: Path | str):
        self.dir = Path(samples_dir)
        table = load_samples(self.dir)
        self.ids: list[str] = table["sample_id"].to_pylist()
        self.prompt = dict(zip(self.ids, table["prompt"].to_pylist()))
        self.response = dict(zip(self.ids, table["response"].to_pylist()))
        self.messages = dict(zip(self.ids, table["messages"].to_pylist()))
        self.split_of = dict(zip(self.ids, table["split"].to_pylist()))
        self._meta = dict(zip(self.ids, table["meta"].to_pylist()))

    def split(self, name: str | None) -> list[str]:
        """The ids of one split (every id for None), in the samples' order."""
        return [sid for sid in self.ids if name is None or self.split_of[sid] == name]

    def meta(self, sample_id: str) -> dict:
        return json.loads(self._meta[sample_id] or "{}")

    def row(self, sample_id: str) -> dict:
        return {"sample_id": sample_id, "prompt": self.prompt[sample_id], "response": self.response[sample_id],
                "messages": self.messages[sample_id]}

    def content_sha256(self, sample_id: str, generation: dict | None) -> str:
        """What this sample's cache row must have scored (pipeline.fingerprint.content_sha256, the writer's rule)."""
        return content_sha256(self.row(sample_id), generation)


class SpeechIndex:
    """The clips of one speech store, by sample: per rendition (sorted by id) the (spoken turn, position in the store)
    of each of its clips, by turn, and every clip's voice. Reads the store's index only, never its features. A store
    is a FeatureStore (stored features) or an AudioStore (the audio itself, for a student that runs its own
    processor): the same interface."""

    def __init__(self, store: FeatureStore | AudioStore):
        self.store = store
        self.dir = store.dir
        by_sample: dict[str, dict[str, list[tuple[int, int]]]] = {}
        for pos, (sid, rend, turn) in enumerate(store.keys()):
            by_sample.setdefault(sid, {}).setdefault(rend, []).append((turn, pos))
        self._clips = {sid: [(rend, tuple(sorted(clips))) for rend, clips in sorted(rends.items())]
                       for sid, rends in by_sample.items()}  # fmt: skip

    @classmethod
    def open(cls, directory: Path | str, keep_row_groups: int = 32, speech: str = "features",
             verify: bool = True) -> "SpeechIndex":  # fmt: skip
        """The index of a features directory (every shard checked against its manifest's sha256 unless not
        `verify`), or with speech="audio" of an audio directory (its index.parquet)."""
        if speech == "audio":
            return cls(AudioStore(directory))
        return cls(FeatureStore(directory, keep_row_groups=keep_row_groups, verify=verify))

    def clips(self, sample_id: str) -> list[tuple[tuple[int, int], ...]]:
        """A sample's clips, per rendition (by id): the (spoken turn, position in the store) of each, by turn."""
        return [clips for _, clips in self._clips.get(sample_id, ())]

    def first(self, sample_id: str) -> int | None:
        """The one clip an eval question is asked with: its first rendition by name, its last spoken turn."""
        clips = self._clips.get(sample_id)
        return clips[0][1][-1][1] if clips else None

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._clips

    @property
    def voices(self) -> set[str]:
        """Every voice the store's clips are spoken in (the features' voice column)."""
        return set(self.store.voices.tolist())


# The held-out eval sets: (report key prefix, its option, the flow's directory suffix, what it holds out)
HELDOUT_SETS = (("heldout_voice", "heldout_features", schemas.HELDOUT_VOICE_SUFFIX, "voice"),
                ("heldout_tts", "heldout_tts_features", schemas.HELDOUT_TTS_SUFFIX, "synthesizer"))  # fmt: skip


@dataclass
class HeldoutSet:
    key: str  # report key prefix: heldout_voice | heldout_tts
    flag: str  # the option that names it
    what: str  # voice | synthesizer
    speech: SpeechIndex


def heldout_dir(speech_dir: Path, option: str | None, suffix: str, flag: str) -> Path | None:
    """Where the eval split spoken by a voice (or synthesizer) never used in training is: `option` itself, or with
    `auto` the flow's `<features><suffix>` beside the training features when it exists; None for ''."""
    if option is None or option == "":
        return None
    if option != "auto":
        path = Path(option)
        if not path.is_dir():
            raise MissingInput(f"{flag} {path}: no speech features there; make them with the flow (--heldout-voice, "
                               f"--heldout-tts) or pipeline.speech --split eval + pipeline.features")  # fmt: skip
        return path
    path = Path(speech_dir).parent / (Path(speech_dir).name + suffix)
    return path if path.is_dir() else None


@dataclass
class RunInputs:
    """The cache and what it names, opened once for a run (training or evaluation)."""

    reader: CacheReader
    samples: Samples
    features_dir: Path  # the training speech's directory: stored features, or (speech "audio") an audio index
    speech: SpeechIndex | None  # the training speech (None: a run that needs no speech)
    kind: str = "features"  # what the speech is: features (stored) | audio (read by the student's processor)
    verify: bool = True  # feature shards checked against their manifest's sha256 (the held-out sets' too)

    @classmethod
    def open(cls, cache: Path | str | CacheReader, samples_dir: Path | str | None = None,
             features_dir: Path | str | None = None, need_speech: bool = True, verify: bool = True,
             keep_row_groups: int = 64, speech: str = "features", audio_dir: Path | str | None = None) -> "RunInputs":  # fmt: skip
        """The cache (every shard checked once, here), the samples and speech it names unless given (resolved
        against the cache directory, so any working directory works). speech="audio": the audio itself (`audio_dir`,
        else the manifest's, else the features directory's sibling `audio`), for a student with its own processor."""
        reader = cache if isinstance(cache, CacheReader) else CacheReader(cache, verify=verify)
        samples_dir = samples_dir or reader.input_path("samples_dir")
        features_dir = features_dir or reader.input_path("features_dir")
        if not samples_dir or not features_dir:
            raise MissingInput(f"{reader.dir}/manifest.json does not say where the samples/features are: pass "
                               f"--samples and --features")  # fmt: skip
        where = Path(features_dir)
        if speech == "audio":  # given, else the manifest's, else beside the features
            recorded = reader.input_path("audio_dir")
            where = Path(audio_dir or (recorded if recorded and Path(recorded).is_dir() else
                                       Path(features_dir).parent / "audio"))  # fmt: skip
        # a shuffle window of 8 cache row groups touches ~40 feature row groups (64 clips each)
        index = SpeechIndex.open(where, keep_row_groups, speech, verify) if need_speech else None
        return cls(reader, Samples(samples_dir), where, index, speech, verify)

    @property
    def samples_dir(self) -> Path:
        return self.samples.dir

    def heldout_sets(self, options: dict[str, str | None]) -> list[HeldoutSet]:
        """Each held-out eval set there is (`options`: each set's option name in HELDOUT_SETS -> its value),
        refused when its speech has a voice the training speech has."""
        found = []
        for key, option, suffix, what in HELDOUT_SETS:
            flag = "--" + option.replace("_", "-")
            path = heldout_dir(self.features_dir, options.get(option, "auto"), suffix, flag)
            if path is None:
                continue
            held = SpeechIndex.open(path, speech=self.kind, verify=self.verify)
            heard = held.voices & self.speech.voices if self.speech is not None else set()
            if heard:
                raise ConfigError(f"{flag} {path}: voice(s) {sorted(heard)} are also in the training speech "
                                  f"({self.features_dir}); a held-out set must be spoken in voices training never "
                                  f"used")  # fmt: skip
            found.append(HeldoutSet(key, flag, what, held))
        return found
