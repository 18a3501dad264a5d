"""Caching throughput on 1 vs N workers, side by side in one run.

    .venv/bin/python bench/cache_scaling.py                      # this machine: in-process, 1 and 2 Ray workers
    .venv/bin/python bench/cache_scaling.py --workers 1,2,4,8 --teacher Qwen/Qwen2.5-7B-Instruct \\
        --dtype bfloat16 --samples 20000                         # a node with 8 GPUs (each worker claims 1)
    .venv/bin/python bench/cache_scaling.py --ray-address auto --workers 8,16 ...   # a Ray cluster (see README)

Each setting caches the same samples into a fresh cache with the code the cache-teacher flow runs: the
default in-process path (one engine, no Ray), then `--workers N` Ray tasks over N partitions (prefect-ray's
RayTaskRunner, each task its own vLLM engine; a local Ray cluster unless --ray-address). Reported: wall time of
the caching step (engine starts included), the scoring rate over every scored token (prompt + response) with
engine starts excluded (total tokens / the slowest worker's scoring time), and both as ratios to the in-process
run. The default teacher is the ~50M-parameter Llama with a 32k vocabulary of bench/cache_throughput.py (random
weights: the rate does not depend on them). Writes bench/results/cache_scaling.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.cache_throughput
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # as flows/cache_teacher.py

from prefect import flow  # noqa: E402

from pipeline import schemas  # noqa: E402
from pipeline.cache import CacheReader  # noqa: E402
from pipeline.samples import ingest  # noqa: E402
from pipeline.teacher import cache_teacher_logits  # noqa: E402
from pipeline.teacher_config import TeacherConfig  # noqa: E402

WORK = Path("data/bench/scaling")


@flow(name="cache-scaling-bench", log_prints=True)
def run_workers(cfg: TeacherConfig, workers: int, ray_address: str | None) -> dict:
    """The flow's Ray path (flows/cache_teacher.py cache_on_workers) for `workers` workers."""
    from flows.cache_teacher import CacheFlowConfig, cache_on_workers

    return cache_on_workers(CacheFlowConfig(workers=workers, ray_address=ray_address), cfg)


def measure(name: str, cfg: TeacherConfig, workers: int | None, ray_address: str | None) -> dict:
    shutil.rmtree(cfg.out, ignore_errors=True)
    t = time.perf_counter()
    if workers is None:
        summary = cache_teacher_logits(cfg, progress=False)
    else:
        summary = run_workers(cfg, workers, ray_address)
    wall = time.perf_counter() - t
    reader = CacheReader(cfg.out)
    assert reader.num_rows == summary["cache_rows"] and len(set(reader.sample_ids())) == reader.num_rows
    return {"setting": name, "workers": workers or 1, "partitions": summary["partitions"],
            "samples_cached": summary["cached_now"], "tokens_scored": summary["tokens_scored"],
            "wall_s": round(wall, 1), "engine_start_s": summary["engine_start_seconds"],
            "scoring_s": summary["scoring_seconds"], "scored_tok_s": summary["tokens_per_second"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000, help="toy-world samples cached per setting")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to run after the in-process baseline")
    parser.add_argument("--teacher", default=None, help="HF id or dir (default: the 50M/32k random Llama)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="per engine (CPU)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--ray-address", default=None)
    args = parser.parse_args()
    samples_dir = Path("data/bench/samples")
    if not (samples_dir / "samples.parquet").exists():
        ingest("toy-world", samples_dir, progress=False)
    teacher = args.teacher
    if teacher is None:
        from bench.cache_throughput import build_random_llama

        if not (schemas.TEACHER_DIR / "config.json").exists():
            from toy.teacher import TeacherConfig as ToyTeacherConfig
            from toy.teacher import build_teacher

            build_teacher(samples_dir, schemas.TEACHER_DIR, ToyTeacherConfig())  # its tokenizer + chat template
        teacher = str(build_random_llama(Path("data/bench/llama50m-32k"), schemas.TEACHER_DIR))
    base = TeacherConfig(samples=str(samples_dir), teacher=teacher, dtype=args.dtype, top_k=args.top_k,
                         limit=args.samples, kv_cache_gib=args.kv_cache_gib,
                         tensor_parallel_size=args.tensor_parallel_size)  # fmt: skip
    results = [measure("in-process (default)", replace(base, out=str(WORK / "in-process")), None, None)]
    print(json.dumps(results[-1]), flush=True)
    for n in [int(w) for w in args.workers.split(",") if w]:
        cfg = replace(base, out=str(WORK / f"ray-{n}"), partitions=n)
        results.append(measure(f"{n} Ray worker{'s' if n > 1 else ''}", cfg, n, args.ray_address))
        print(json.dumps(results[-1]), flush=True)
    ref = results[0]
    for r in results:
        r["scored_tok_s_ratio"] = round(r["scored_tok_s"] / ref["scored_tok_s"], 2)
        r["wall_ratio"] = round(ref["wall_s"] / r["wall_s"], 2)
    info = {"cpus": os.cpu_count(), "teacher": teacher, "dtype": args.dtype, "top_k": args.top_k,
            "samples": args.samples, "results": results}  # fmt: skip
    out = Path("bench/results/cache_scaling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2))
    print(f"\n{args.samples} samples, top-{args.top_k}, {os.cpu_count()} CPUs, teacher {teacher}\n")
    print("| setting | partitions | wall s (engine starts incl.) | engine start s | scored tok/s | tok/s vs "
          "in-process | wall speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setting']} | {r['partitions']} | {r['wall_s']} | {r['engine_start_s']} | {r['scored_tok_s']:.0f} "
              f"| {r['scored_tok_s_ratio']:.2f}x | {r['wall_ratio']:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
