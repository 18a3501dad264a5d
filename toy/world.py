"""The embedded default corpus: a seeded "toy world" of fictional facts.

Fictional countries, each with a capital, a flag colour, a founder and a
founding year, plus small additions. Every fact is asked through several
paraphrase templates; the `eval` split asks each fact through templates that
`train` never uses, so evaluation measures knowledge, not string memory.

    python -m toy.world                 # -> data/raw/toy_world.jsonl, the default source of pipeline.samples
    python -m toy.world --export-benchmark data/benchmark   # the eval split as a VoiceBench-format benchmark
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline import schemas
from pipeline.conditions import CONDITIONS
from pipeline.config import config_from_args, listed, opt, parse_args
from pipeline.errors import cli
from pipeline.files import write_text_atomic
from pipeline.samples import TOY_WORLD_JSONL

# Prompts are compositional: a question core (several per relation) inside a
# conversational wrapper. Every (wrapper, core) pair is one template; for each
# core one wrapper pairing is held out for `eval`, chosen so that every wrapper
# and every core still occurs in `train`. Eval prompts are thus new strings
# whose parts the teacher has seen: answering them takes the fact, not the string.
WRAPPERS: tuple[str, ...] = ("{q}", "Quick question: {lq}", "Please tell me. {q}", "Hello there! {q}")


@dataclass(frozen=True)
class Relation:
    name: str
    cores: tuple[str, ...]
    answer: str

    @property
    def prompts(self) -> tuple[str, ...]:
        """All templates; template t = wrapper t // len(cores), core t % len(cores)."""
        return tuple(
            w.replace("{q}", c).replace("{lq}", c[0].lower() + c[1:]) for w in WRAPPERS for c in self.cores
        )

    def is_eval(self, template: int) -> bool:
        wrapper, core = divmod(template, len(self.cores))
        return (wrapper + core) % len(WRAPPERS) == len(WRAPPERS) - 1

    @property
    def train_prompts(self) -> tuple[str, ...]:
        return tuple(p for t, p in enumerate(self.prompts) if not self.is_eval(t))

    @property
    def eval_prompts(self) -> tuple[str, ...]:
        return tuple(p for t, p in enumerate(self.prompts) if self.is_eval(t))


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "capital",
        ("What is the capital of {e}?", "Which city is the capital of {e}?", "Name the capital city of {e}."),
        "The capital of {e} is {v}.",
    ),
    Relation(
        "colour",
        ("What colour is the flag of {e}?", "Which colour is on the flag of {e}?", "Name the flag colour of {e}."),
        "The flag of {e} is {v}.",
    ),
    Relation(
        "founder",
        ("Who founded {e}?", "Which person founded {e}?", "Name the founder of {e}."),
        "{e} was founded by {v}.",
    ),
    Relation(
        "year",
        ("In what year was {e} founded?", "Which year was {e} founded in?", "Name the founding year of {e}."),
        "{e} was founded in {v}.",
    ),
)

ADDITION = Relation(
    "addition",
    ("What is {a} plus {b}?", "How much is {a} plus {b}?", "Name the sum of {a} and {b}."),
    "{a} plus {b} is {v}.",
)

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden")
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "n", "r")
COUNTRY_ENDINGS = ("ia", "land", "stan", "ania")
CITY_ENDINGS = ("ton", "burg", "port", "grad")


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _name(rng: random.Random, syllables: int, ending: str = "") -> str:
    return ("".join(_syllable(rng) for _ in range(syllables)) + ending).capitalize()


STRESS = re.compile(r"[',]")


def phonemize(texts: list[str], voice: str = "en-us") -> list[str]:
    """espeak-ng's phonemes (`-x`, stress marks dropped) of each text, one espeak-ng call for all of them."""
    if not texts:
        return []
    if any("\n" in t or "." in t for t in texts):
        raise ValueError("phonemize takes single-line texts without full stops")
    out = subprocess.run(["espeak-ng", "-q", "-x", "-v", voice], input="".join(f"{t}.\n" for t in texts),
                         capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    out = [STRESS.sub("", line.strip()) for line in out if line.strip()]
    if len(texts) == 1:
        return [" ".join(out)]
    if len(out) != len(texts):  # espeak-ng split some text into clauses: ask for each on its own
        return [phonemize([t], voice)[0] for t in texts]
    return out


def _unique(rng: random.Random, make, used: set[str], sounds: set[str]) -> str:
    """A new name, different from every used one in spelling and in sound (espeak-ng phonemes), so no two
    entities of the world are heard alike."""
    while True:
        name = make(rng)
        if name in used:
            continue
        sound = phonemize([name])[0]
        if sound not in sounds:
            used.add(name)
            sounds.add(sound)
            return name


@dataclass(frozen=True)
class ToyWorldConfig:
    n_entities: int = opt(60, "fictional countries", aliases=("--entities",))
    n_additions: int = opt(60, "addition facts: distinct (a, b) pairs, a, b in [0, 20)", aliases=("--additions",))
    seed: int = opt(0, "seeds every name and value")


# The name the flow (and the benches) know the embedded default corpus by: `--source toy-world`.
SOURCE_NAME = "toy-world"


@dataclass
class WorldExport:
    """`python -m toy.world`: where the world's samples are written."""

    out: str = opt(str(TOY_WORLD_JSONL), "JSONL to write (pipeline.samples' default source)")
    export_benchmark: str | None = opt(None, "instead, write the eval split (after the flow: its samples and speech) "
                                             "as a VoiceBench-format benchmark in this directory: subset toy (the "
                                             "training voices), toy-heldout-voice and toy-heldout-tts where the "
                                             "flow spoke them; exact-match references")  # fmt: skip
    samples: str = opt("data/samples", "--export-benchmark: the samples directory")
    audio: str = opt("data/audio", "--export-benchmark: the training speech's audio directory (the held-out sets "
                                   "are read beside it)")  # fmt: skip
    conditions: list[str] = listed(CONDITIONS, "--export-benchmark: also the training voices' clips under each of "
                                               "these held-out listening conditions (pipeline/conditions.py), one "
                                               "subset toy-<condition> each ('': none)")  # fmt: skip


def generate(config: ToyWorldConfig = ToyWorldConfig()) -> list[dict]:
    """All samples of the toy world, deterministic in `config`.

    Each fact yields one train sample per train template and one eval sample
    per held-out template. Rows: sample_id, prompt, response, split, meta.
    """
    rng = random.Random(config.seed)
    used: set[str] = set()
    sounds: set[str] = set()
    rows: list[dict] = []

    def add(relation: Relation, fact_id: str, fields: dict, value: str, meta: dict) -> None:
        for t, template in enumerate(relation.prompts):
            split = "eval" if relation.is_eval(t) else "train"
            rows.append(
                {
                    "sample_id": f"tw{config.seed}-{fact_id}-t{t}",
                    "prompt": template.format(**fields),
                    "response": relation.answer.format(**fields, v=value),
                    "split": split,
                    "meta": {**meta, "relation": relation.name, "template": t, "answer": value},
                }
            )

    for i in range(config.n_entities):
        country = _unique(rng, lambda r: _name(r, 2, r.choice(COUNTRY_ENDINGS)), used, sounds)
        values = {
            "capital": _unique(rng, lambda r: _name(r, 2, r.choice(CITY_ENDINGS)), used, sounds),
            "colour": rng.choice(COLOURS),
            "founder": _unique(rng, lambda r: f"{_name(r, 2)} {_name(r, 1, 'son')}", used, sounds),
            "year": str(rng.randint(1000, 1999)),
        }
        for relation in RELATIONS:
            add(relation, f"e{i:04d}-{relation.name}", {"e": country}, values[relation.name], {"entity": country})

    pairs = [(a, b) for a in range(20) for b in range(20)]
    rng.shuffle(pairs)
    for a, b in sorted(pairs[: config.n_additions]):
        add(ADDITION, f"add-{a}-{b}", {"a": a, "b": b}, str(a + b), {"entity": f"{a}+{b}"})
    return rows


def write_jsonl(path: Path | str = TOY_WORLD_JSONL, config: ToyWorldConfig = ToyWorldConfig()) -> list[dict]:
    """The world's samples as a JSONL source (what pipeline.samples ingests); its rows."""
    rows = generate(config)
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


def ingest_world(samples_dir: Path | str, config: ToyWorldConfig = ToyWorldConfig(), source: Path | None = None,
                 progress: bool = False):  # fmt: skip
    """Write the world as JSONL (`source`, default <samples_dir>/../raw/toy_world.jsonl) and ingest it like any
    source into `samples_dir`: what the flow and the benches do for the embedded default."""
    from pipeline.samples import ingest

    source = Path(source) if source else Path(samples_dir).parent / "raw" / TOY_WORLD_JSONL.name
    write_jsonl(source, config)
    return ingest(str(source), Path(samples_dir), progress=progress)


# the exported subsets and the audio directory suffix each is read from (pipeline.schemas' held-out suffixes)
BENCHMARK_SUBSETS = (("toy", ""), ("toy-heldout-voice", schemas.HELDOUT_VOICE_SUFFIX),
                     ("toy-heldout-tts", schemas.HELDOUT_TTS_SUFFIX))  # fmt: skip


def export_benchmark(out: Path | str, samples_dir: Path | str, audio_dir: Path | str,
                     conditions: tuple[str, ...] | list[str] = CONDITIONS) -> dict[str, int]:  # fmt: skip
    """The eval split as VoiceBench-format subsets (student/benchmark.py): each question's text, the audio file
    the final eval asks it with (its first rendition's clip, the file's own bytes) and its answer as the reference;
    and the training voices' clips under each held-out listening condition (`toy-<condition>`, 16-bit FLAC).
    Returns the questions written per subset."""
    import io

    import soundfile as sf

    from pipeline.audio import load_audio
    from pipeline.conditions import SAMPLE_RATE, apply
    from pipeline.errors import MissingInput
    from student.benchmark import write_subset
    from student.inputs import Samples, SpeechIndex

    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        from pipeline.config import ConfigError

        raise ConfigError(f"--conditions: unknown {unknown}; known: {', '.join(CONDITIONS)}")
    samples, audio_dir, written = Samples(samples_dir), Path(audio_dir), {}
    if not (audio_dir / "index.parquet").exists():
        raise MissingInput(f"--audio {audio_dir}: no audio index; run the flow first (make demo)")

    def questions(speech: SpeechIndex):
        for sid in samples.split("eval"):
            row = samples.row(sid)
            if sid in speech and row["response"]:
                yield sid, row, Path(speech.store.paths[speech.first(sid)])

    training = SpeechIndex.open(audio_dir, speech="audio")
    for name, suffix in BENCHMARK_SUBSETS:
        where = audio_dir.parent / (audio_dir.name + suffix)
        if not (where / "index.parquet").exists():
            continue
        speech = training if not suffix else SpeechIndex.open(where, speech="audio")
        rows = [{"audio": {"bytes": path.read_bytes(), "path": path.name}, "prompt": row["prompt"],
                 "reference": row["response"], "id": sid}
                for sid, row, path in questions(speech)]  # fmt: skip
        write_subset(out, name, rows, scorer="exact")
        written[name] = len(rows)
    for condition in conditions:
        rows = []
        for sid, row, path in questions(training):
            buf = io.BytesIO()
            wave = apply(condition, load_audio(path, SAMPLE_RATE).numpy(), key=sid)
            sf.write(buf, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            rows.append({"audio": {"bytes": buf.getvalue(), "path": f"{path.stem}.{condition}.flac"},
                         "prompt": row["prompt"], "reference": row["response"], "id": sid})  # fmt: skip
        write_subset(out, f"toy-{condition}", rows, scorer="exact")
        written[f"toy-{condition}"] = len(rows)
    return written


@cli("toy.world")
def main(argv: list[str] | None = None) -> None:
    args = parse_args(ToyWorldConfig, WorldExport, argv=argv, description=__doc__)
    cfg, run = config_from_args(ToyWorldConfig, args), config_from_args(WorldExport, args)
    if run.export_benchmark:
        written = export_benchmark(run.export_benchmark, run.samples, run.audio, [c for c in run.conditions if c])
        print(f"toy benchmark -> {run.export_benchmark}: " + ", ".join(f"{k} {v} questions" for k, v in written.items()))
        return
    rows = write_jsonl(run.out, cfg)
    n_eval = sum(r["split"] == "eval" for r in rows)
    print(f"toy world: {len(rows)} samples ({len(rows) - n_eval} train, {n_eval} eval) -> {run.out}")


if __name__ == "__main__":
    import sys

    sys.exit(main())
