"""The student's data path at 1x and 10x the demo's cache: peak memory and examples/s, side by side.

    python -m bench.student_data                  # after `make demo`; ~3 min here
    python -m bench.student_data --scale 10 --steps 300 --workers 1
    python -m bench.student_data --compare-formats    # also the features stored as versions before

Builds, from the demo's cache + features + samples (data/), a copy at 1x and a
copy at `--scale`x (every sample repeated under new ids: same rows, same
bytes, valid manifest with sha256 per shard) under data/bench/student_data/,
then measures each in a fresh process:

  streaming   the training path: StudentData (index only) + BlockShuffleSampler +
              StepBatches through a torch DataLoader with `--workers` workers,
              `--steps` global batches of `--batch-size`
  in-memory   for contrast, every example decoded into memory first (the
              `load_examples` helper; what the student did before it streamed)

and reports peak RSS (the process, and its DataLoader workers: the largest one)
and examples/s. The copies' features are written as pipeline.features writes
them (version 2: one float16 blob per clip, WRITE_OPTIONS); `--compare-formats`
also measures the streaming path at `--scale`x over the features stored as
version 1 (list<halffloat>), plain and with pyarrow's default dictionary
encoding (how pipeline.features wrote them before). Writes
bench/results/student_data.{json,md}.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.report import REPO, write_results
from pipeline.config import listed, opt, parse_config


FORMATS = ("v2", "v1-plain", "v1-dictionary")  # features as written now; version 1 without / with a dictionary


def features_as(table: pa.Table, fmt: str) -> tuple[pa.Table, dict]:
    """A features shard's table in the format `fmt`, and the write options it was written with."""
    import numpy as np

    from pipeline import schemas
    from pipeline.features import WRITE_OPTIONS

    version = 2 if fmt == "v2" else 1
    column = table["fbank"].combine_chunks()
    if version == 2 and column.type != pa.binary():
        column = pa.array([v.values.to_numpy(zero_copy_only=False).astype("<f2").tobytes() for v in column], pa.binary())
    elif version == 1 and column.type == pa.binary():
        column = pa.array([np.frombuffer(b, "<f2") for b in column.to_pylist()], pa.list_(pa.float16()))
    field = pa.field("fbank", column.type, nullable=False)
    meta = {**table.schema.metadata, schemas.VERSION_KEY: str(version).encode()}
    table = table.set_column(table.schema.get_field_index("fbank"), field, column).replace_schema_metadata(meta)
    return table, {**WRITE_OPTIONS, **({"use_dictionary": True} if fmt == "v1-dictionary" else {})}


def replicate(src_data: Path, out: Path, scale: int, fmt: str = "v2") -> Path:
    """A copy of samples/features/cache with every sample repeated `scale` times under new ids (features in the
    format `fmt`, see FORMATS)."""
    from pipeline import schemas
    from pipeline.cache import MANIFEST, _sha256, read_manifest
    from pipeline.parquet_io import write_table_atomic
    from pipeline.samples import SAMPLES_FILE

    if (out / "cache" / MANIFEST).exists():
        return out / "cache"
    shutil.rmtree(out, ignore_errors=True)

    def renamed(table: pa.Table, rep: int) -> pa.Table:
        if rep == 0:
            return table
        ids = pa.array([f"{s}~{rep}" for s in table["sample_id"].to_pylist()], type=pa.string())
        return table.set_column(table.schema.get_field_index("sample_id"), table.schema.field("sample_id"), ids)

    samples = pq.read_table(src_data / "samples" / SAMPLES_FILE)
    write_table_atomic(pa.concat_tables([renamed(samples, r) for r in range(scale)]), out / "samples" / SAMPLES_FILE)
    n = 0
    for path in sorted((src_data / "features").glob("part-*.parquet")):
        table, options = features_as(pq.read_table(path), fmt)
        for rep in range(scale):
            write_table_atomic(renamed(table, rep), out / "features" / f"part-{n:05d}.parquet", **options)
            n += 1
    manifest = read_manifest(src_data / "cache")
    shards, n = {}, 0
    for name in sorted(manifest["shards"]):
        table = pq.read_table(src_data / "cache" / name)
        for rep in range(scale):
            path = write_table_atomic(renamed(table, rep), out / "cache" / f"part-{n:05d}.parquet", row_group_size=256)
            shards[path.name] = {"rows": table.num_rows, "bytes": path.stat().st_size, "sha256": _sha256(path)}
            n += 1
    teacher = os.path.relpath((src_data / "models" / "teacher").resolve(), (out / "cache").resolve())
    manifest.update(shards=shards, inputs={"samples_dir": "../samples", "features_dir": "../features",
                                           "teacher": teacher}, inputs_relative_to="manifest")  # fmt: skip
    manifest["schema_version"] = schemas.CACHE_VERSION
    (out / "cache" / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out / "cache"


def measure(cache: str, mode: str, steps: int, batch_size: int, workers: int) -> dict:
    """Run in a fresh process: the data path alone (no model), its peak RSS and examples/s."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader
    from student.data import BlockShuffleSampler, StepBatches, StudentData, load_examples

    tok = AutoTokenizer.from_pretrained(CacheReader(cache).teacher)
    t0 = time.perf_counter()
    if mode == "in-memory":
        examples, _ = load_examples(Path(cache), tok)
        n, setup = len(examples), time.perf_counter() - t0
        from student.data import collate

        rng = np.random.default_rng(0)
        t1 = time.perf_counter()
        for _ in range(steps):
            collate([examples[i] for i in rng.choice(n, batch_size, replace=False)], tok.pad_token_id)
        run = time.perf_counter() - t1
        worker_rss = 0
    else:
        data = StudentData.open(cache, tok)
        n, setup = len(data), time.perf_counter() - t0
        sampler = BlockShuffleSampler(np.arange(n), data.block_of(), batch_size, seed=0)
        loader = torch.utils.data.DataLoader(StepBatches(data, [(0, sampler)], tok.pad_token_id), batch_size=None,
                                             sampler=range(steps), num_workers=workers)  # fmt: skip
        t1 = time.perf_counter()
        for _ in loader:
            pass
        run = time.perf_counter() - t1
        del loader
        worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"mode": mode, "examples": n, "setup_s": round(setup, 2), "examples_per_s": round(steps * batch_size / run),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "worker_peak_rss_mib": round(worker_rss)}  # fmt: skip


def measure_speech_llm(data_dir: Path, student: str, steps: int, batch_size: int, workers: int) -> list[dict]:
    """A pretrained speech LLM's speech path, two ways, each `steps` batches in a DataLoader with `workers` workers:
    its processor on each clip's waveform (what the student does: read the FLAC, the feature extractor at 30 s, the
    audio placeholders expanded), and, for contrast, Whisper log-mel of 128 bins stored by pipeline.features and padded
    to the 30 s window (read + pad only: a lower bound of what that path would cost, before matching the extractor's
    normalization)."""
    import numpy as np
    import torch
    from transformers import AutoProcessor

    from pipeline.features import FeatureConfig, extract_all
    from student.data import BlockShuffleSampler, SpeechLLMPrompts, StepBatches, StudentData
    from student.inputs import SpeechIndex

    processor = AutoProcessor.from_pretrained(student)
    data = StudentData.open(data_dir / "cache", processor.tokenizer, prompts=SpeechLLMPrompts(processor))
    sampler = BlockShuffleSampler(np.arange(len(data)), data.block_of(), batch_size, seed=0)
    loader = torch.utils.data.DataLoader(StepBatches(data, [(0, sampler)], processor.tokenizer.pad_token_id),
                                         batch_size=None, sampler=range(steps), num_workers=workers)  # fmt: skip
    t = time.perf_counter()
    for _ in loader:
        pass
    processor_rate = steps * batch_size / (time.perf_counter() - t)
    stored = data_dir / "bench" / "features-whisper128"
    extract_all(data_dir / "audio" / "index.parquet", stored, FeatureConfig(kind="whisper", n_mels=128), progress=False)
    index = SpeechIndex.open(stored, verify=False)

    class Padded(torch.utils.data.Dataset):
        def __len__(self):
            return 1 << 62

        def __getitem__(self, step):
            rows = sampler.indices(step)
            feats = torch.zeros(len(rows), 128, 3000)
            for b, i in enumerate(rows):
                clip = index.store.read(index.first(data.sample_id(int(i))))
                feats[b, :, : clip.shape[0]] = torch.from_numpy(clip.astype(np.float32).T)
            return feats

    loader = torch.utils.data.DataLoader(Padded(), batch_size=None, sampler=range(steps), num_workers=workers)
    t = time.perf_counter()
    for _ in loader:
        pass
    stored_rate = steps * batch_size / (time.perf_counter() - t)
    return [{"mode": "speech LLM: processor on the waveform", "examples_per_s": round(processor_rate, 1)},
            {"mode": "speech LLM: stored Whisper-128 features, read + padded", "examples_per_s": round(stored_rate, 1)}]


@dataclass
class StudentDataBench:
    data: str = opt("data", "the demo's data directory")
    scale: int = opt(10, "the larger copy: every sample this many times")
    steps: int = opt(300, "global batches read per measurement")
    batch_size: int = opt(32, "examples per global batch")
    workers: int = opt(1, "DataLoader workers")
    skip_in_memory: bool = opt(False, "measure the streaming path only")
    compare_formats: bool = opt(False, "also stream at --scale x from features stored as version 1, plain and "
                                       "dictionary-encoded")  # fmt: skip
    measure: list[str] = listed((), "internal: measure CACHE,MODE in this process and print its JSON")
    speech_llm: str | None = opt(None, "instead: a pretrained speech LLM's speech path (its processor on the audio vs "
                                       "stored Whisper features), with this student's processor (python -m "
                                       "toy.speech_llm makes one)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_config(StudentDataBench, argv, description=__doc__)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.steps, args.batch_size, args.workers)))
        return 0
    data = Path(args.data)
    if args.speech_llm:
        rows = measure_speech_llm(data, args.speech_llm, args.steps, args.batch_size, args.workers)
        lines = [f"the demo's data, batches of {args.batch_size}, {args.steps} batches, {args.workers} DataLoader "
                 f"worker(s); processor: {args.speech_llm}", "", "| speech path | examples/s |", "|---|---|"]  # fmt: skip
        lines += [f"| {r['mode']} | {r['examples_per_s']} |" for r in rows]
        write_results("student_data_speech_llm", rows, "\n".join(lines))
        print("\n".join(lines))
        return 0
    root = data / "bench" / "student_data"
    results = []
    modes = ("streaming", *(() if args.skip_in_memory else ("in-memory",)))
    runs = [(1, "v2", modes), (args.scale, "v2", modes)]
    if args.compare_formats:
        runs += [(args.scale, fmt, ("streaming",)) for fmt in FORMATS[1:]]
    for scale, fmt, run_modes in runs:
        cache = replicate(data, root / f"x{scale}-{fmt}", scale, fmt)
        for mode in run_modes:
            r = subprocess.run([sys.executable, "-m", "bench.student_data", "--measure", f"{cache},{mode}",
                                "--steps", str(args.steps),
                                "--batch-size", str(args.batch_size), "--workers", str(args.workers)],
                               capture_output=True, text=True, cwd=REPO)  # fmt: skip
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            results.append({"scale": f"{scale}x", "features": fmt,
                            **json.loads(r.stdout.strip().splitlines()[-1])})  # fmt: skip
            print(results[-1], flush=True)
    lines = ["| scale | data path | features stored | examples | setup s | examples/s | peak RSS MiB (process) | "
             "peak RSS MiB (worker) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['scale']} | {r['mode']} | {r['features']} | {r['examples']} | {r['setup_s']} | "
                     f"{r['examples_per_s']} | {r['peak_rss_mib']} | {r['worker_peak_rss_mib'] or '-'} |")  # fmt: skip
    stream = [r for r in results if r["mode"] == "streaming" and r["features"] == "v2"]
    ratio = (stream[1]["peak_rss_mib"] + stream[1]["worker_peak_rss_mib"]) / (
        stream[0]["peak_rss_mib"] + stream[0]["worker_peak_rss_mib"])  # fmt: skip
    lines.append(f"\nstreaming peak RSS (process + worker) at {args.scale}x / 1x: {ratio:.2f}x (target <= 1.3x)")
    for r in (r for r in results if r["features"] != "v2"):
        lines.append(f"streaming examples/s at {args.scale}x, features v2 / {r['features']}: "
                     f"{stream[1]['examples_per_s'] / r['examples_per_s']:.2f}x")
    table = "\n".join(lines)
    write_results("student_data", results, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
