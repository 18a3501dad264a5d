"""A VoiceBench-format benchmark on disk: its subsets, their questions (text and audio), their references.

    <benchmark dir>/<subset>/                 one directory per subset (alpacaeval, sd-qa, mmsu, ...), holding
        *.parquet                             Parquet files as the Hub stores them (`test-00000-of-00001.parquet`,
                                              sd-qa's `usa-...`: the file name's first part is the split), or
        dataset_info.json + *.arrow           a `datasets` save_to_disk Dataset, or
        dataset_dict.json + <split>/          a save_to_disk DatasetDict
    <benchmark dir>/benchmark.json            optional: {"scorers": {subset: scorer}} for subsets VoiceBench does
                                              not name (the toy world's export)

Save VoiceBench once on a machine with internet (`datasets.load_dataset("hlt-lab/voicebench", subset)
.save_to_disk(DIR/subset)`, or download the Parquet files); nothing is fetched here. Columns: pipeline/schemas.py
(BENCHMARK_SCHEMA). A row that cannot be read is one error naming the subset, the split and the row.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas
from pipeline.errors import CorruptData, InputMismatch, MissingInput

# How each VoiceBench subset is scored (student/scorers.py). mtbench is multi-turn with per-turn audio, not read yet.
VOICEBENCH_SCORERS = {
    "alpacaeval": "judge", "alpacaeval_full": "judge", "commoneval": "judge", "wildvoice": "judge",
    "sd-qa": "judge-qa", "openbookqa": "mcq", "mmsu": "mcq", "bbh": "bbh", "ifeval": "ifeval",
    "advbench": "refusal",
}  # fmt: skip
NEEDS_REFERENCE = ("mcq", "bbh", "judge-qa", "exact")  # the scorers that compare an answer with the row's reference
UNSUPPORTED = {"mtbench": "multi-turn questions with audio per turn are not read yet"}
SAMPLE_RATE = 16_000


@dataclass
class Question:
    """One benchmark row: where it is, its text and audio, its reference, and whatever else its scorer reads."""

    subset: str
    split: str
    row: int
    id: str
    prompt: str
    audio: dict  # {"bytes": ..., "path": ...} as datasets stores an Audio column
    reference: str | None = None
    extra: dict = field(default_factory=dict)  # e.g. ifeval's instruction_id_list / kwargs

    @property
    def where(self) -> str:
        return f"subset {self.subset!r} split {self.split!r} row {self.row}"

    def waveform(self, base: Path) -> np.ndarray:
        """The spoken question, mono float32 at 16 kHz; CorruptData naming the row when it cannot be decoded."""
        import soundfile as sf
        import torch
        import torchaudio.functional as AF

        data, path = self.audio.get("bytes"), self.audio.get("path")
        try:
            if data is not None:
                wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
            elif path:
                wave, sr = sf.read(Path(path) if Path(path).is_absolute() else base / path, dtype="float32",
                                   always_2d=True)  # fmt: skip
            else:
                raise ValueError("the audio column holds neither bytes nor a path")
        except Exception as exc:  # noqa: BLE001 - any decoder error is this row's bad audio
            raise CorruptData(f"{self.where} (id {self.id!r}): audio not decodable ({type(exc).__name__}: {exc}); "
                              f"fix or drop the row, or save the subset again") from None  # fmt: skip
        if wave.shape[0] == 0:
            raise CorruptData(f"{self.where} (id {self.id!r}): the audio is empty; fix or drop the row")
        mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
        if sr != SAMPLE_RATE:
            mono = AF.resample(mono, sr, SAMPLE_RATE)
        return mono.numpy()


@dataclass
class Subset:
    name: str
    scorer: str
    dir: Path
    questions: list[Question]


def scorers_of(root: Path) -> dict[str, str]:
    """Each subset's scorer: VoiceBench's, and those the benchmark's own benchmark.json names."""
    found = dict(VOICEBENCH_SCORERS)
    meta = root / schemas.BENCHMARK_FILE
    if meta.exists():
        try:
            found.update(json.loads(meta.read_text())["scorers"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptData(f"{meta}: not a benchmark.json ({exc}); it holds {{\"scorers\": {{subset: scorer}}}}")
    return found


def _tables(subset_dir: Path) -> list[tuple[str, pa.Table]]:
    """The subset's (split, table) pairs, whichever way `datasets` wrote it."""
    if (subset_dir / "dataset_info.json").exists() or (subset_dir / "dataset_dict.json").exists():
        import datasets

        loaded = datasets.load_from_disk(str(subset_dir))
        splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("test", loaded)]
        return [(name, ds.data.table) for name, ds in splits]
    files = sorted(subset_dir.glob("**/*.parquet"))
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(f.name.split("-")[0] if "-" in f.name else f.stem, []).append(f)
    out = []
    for split, paths in by_split.items():
        try:
            out.append((split, pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default")))
        except (pa.ArrowInvalid, OSError) as exc:
            raise CorruptData(f"subset {subset_dir.name!r}: cannot read {paths[0]} ({exc}); save the subset again")
    return out


def read_subset(root: Path, name: str, scorer: str, splits: list[str] | None = None,
                limit: int | None = None) -> Subset:  # fmt: skip
    """One subset's questions (`splits`: only those; `limit`: the first N of each split)."""
    subset_dir = root / name
    tables = _tables(subset_dir)
    if not tables:
        raise MissingInput(f"subset {name!r}: no Parquet files or saved dataset under {subset_dir}")
    questions = []
    for split, table in tables:
        if splits and split not in splits:
            continue
        missing = {"audio", "prompt"} - set(table.column_names)
        if missing:
            raise InputMismatch(f"subset {name!r} split {split!r}: no column(s) {sorted(missing)} (a VoiceBench "
                                f"subset has audio and prompt; columns here: {table.column_names})")  # fmt: skip
        if scorer in NEEDS_REFERENCE and "reference" not in table.column_names:
            raise InputMismatch(f"subset {name!r} split {split!r}: scorer {scorer} needs a reference column")
        rows = table.slice(0, limit).to_pylist() if limit else table.to_pylist()
        for i, r in enumerate(rows):
            where = f"subset {name!r} split {split!r} row {i}"
            prompt, audio = r.get("prompt"), r.get("audio")
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputMismatch(f"{where}: empty or missing prompt; fix or drop the row")
            if not isinstance(audio, dict) or (audio.get("bytes") is None and not audio.get("path")):
                raise InputMismatch(f"{where}: no audio (neither bytes nor a path); fix or drop the row")
            reference = r.get("reference")
            if scorer in NEEDS_REFERENCE and not (isinstance(reference, str) and reference):
                raise InputMismatch(f"{where}: empty reference (scorer {scorer} needs one); fix or drop the row")
            extra = {k: v for k, v in r.items() if k not in ("audio", "prompt", "reference")}
            qid = str(r.get("id") if r.get("id") is not None else r.get("key", i))
            questions.append(Question(name, split, i, qid, prompt, audio, reference, extra))
    return Subset(name, scorer, subset_dir, questions)


def open_benchmark(root: Path | str, subsets: list[str] | None = None, splits: list[str] | None = None,
                   limit: int | None = None) -> list[Subset]:  # fmt: skip
    """The benchmark's subsets (all it has, or `subsets`), each with its scorer; refuses an unknown one in a line."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"--benchmark {root}: no such directory; save VoiceBench there first (see docs/evaluation.md)")
    scorers = scorers_of(root)
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    names = subsets or present
    out = []
    for name in names:
        if name in UNSUPPORTED:
            if subsets:
                raise InputMismatch(f"subset {name!r}: {UNSUPPORTED[name]}; leave it out of --subsets")
            print(f"note: skipping subset {name!r}: {UNSUPPORTED[name]}")
            continue
        if name not in present:
            raise MissingInput(f"subset {name!r}: no directory {root / name} (subsets here: {present})")
        if name not in scorers:
            raise InputMismatch(f"subset {name!r}: not a VoiceBench subset and {root / schemas.BENCHMARK_FILE} "
                                f"names no scorer for it; add it there (scorers: exact, mcq, bbh, ifeval, refusal, "
                                f"judge, judge-qa)")  # fmt: skip
        out.append(read_subset(root, name, scorers[name], splits, limit))
    return out


def write_subset(root: Path | str, name: str, rows: list[dict], scorer: str | None = None, split: str = "test") -> Path:
    """Write a subset in the format open_benchmark reads (one Parquet file, as the Hub stores a split); `scorer`
    records how it is scored in benchmark.json for a subset VoiceBench does not name. Rows: BENCHMARK_SCHEMA."""
    from pipeline.files import atomic_write, write_json_atomic

    root = Path(root)
    out = root / name / f"{split}-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schemas.with_metadata(schemas.BENCHMARK_SCHEMA, "benchmark",
                                                                     schemas.BENCHMARK_VERSION))  # fmt: skip
    with atomic_write(out) as tmp:
        pq.write_table(table, tmp)
    if scorer is not None:
        meta = root / schemas.BENCHMARK_FILE
        current = json.loads(meta.read_text()) if meta.exists() else {"scorers": {}}
        current["scorers"][name] = scorer
        write_json_atomic(meta, current)
    return out
