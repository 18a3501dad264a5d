"""Caching throughput on 1 vs N workers, side by side in one run.

    python -m bench.cache_scaling                      # this machine: in-process, 1 and 2 Ray workers
    python -m bench.cache_scaling --workers 1,2,4,8 --teacher Qwen/Qwen2.5-7B-Instruct \\
        --dtype bfloat16 --samples 20000                         # a node with 8 GPUs (each worker claims 1)
    python -m bench.cache_scaling --ray-address auto --workers 8,16 ...   # a Ray cluster (docs/pipeline.md)

Each setting caches the same samples into a fresh cache with the code the cache-teacher flow runs: the
default in-process path (one engine, no Ray), then `--workers N` Ray tasks over N partitions (prefect-ray's
RayTaskRunner, each task its own vLLM engine; a local Ray cluster unless --ray-address). Reported: wall time of
the caching step (engine starts included), the scoring rate over every scored token (prompt + response) with
engine starts excluded (total tokens / the slowest worker's scoring time), and both as ratios to the in-process
run. The default teacher is the ~50M-parameter Llama with a 32k vocabulary of bench/cache_throughput.py (random
weights: the rate does not depend on them). Writes bench/results/cache_scaling.{json,md}.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # as flows/cache_teacher.py

from prefect import flow  # noqa: E402

from bench.common import toy_samples, toy_teacher  # noqa: E402
from bench.report import write_results  # noqa: E402
from pipeline.cache import CacheReader  # noqa: E402
from pipeline.config import listed, opt, parse_config  # noqa: E402
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


@dataclass
class CacheScalingBench:
    samples: int = opt(3000, "toy-world samples cached per setting")
    workers: list[int] = listed((1, 2), "Ray worker counts to run after the in-process baseline")
    teacher: str | None = opt(None, "HF id or dir (default: the 50M/32k random Llama)")
    dtype: str = opt("auto", "the teacher's dtype")
    top_k: int = opt(64, "logprobs kept per position")
    kv_cache_gib: float = opt(1.0, "per engine (CPU)")
    tensor_parallel_size: int = opt(1, "GPUs per engine")
    ray_address: str | None = opt(None, "join this Ray cluster instead of starting a local one")


def main(argv: list[str] | None = None) -> int:
    args = parse_config(CacheScalingBench, argv, description=__doc__)
    samples_dir = toy_samples()
    teacher = args.teacher
    if teacher is None:
        from bench.cache_throughput import build_random_llama

        teacher = str(build_random_llama(Path("data/bench/llama50m-32k"), toy_teacher(samples_dir)))
    base = TeacherConfig(samples=str(samples_dir), teacher=teacher, dtype=args.dtype, top_k=args.top_k,
                         limit=args.samples, kv_cache_gib=args.kv_cache_gib,
                         tensor_parallel_size=args.tensor_parallel_size)  # fmt: skip
    results = [measure("in-process (default)", replace(base, out=str(WORK / "in-process")), None, None)]
    print(json.dumps(results[-1]), flush=True)
    for n in args.workers:
        cfg = replace(base, out=str(WORK / f"ray-{n}"), partitions=n)
        results.append(measure(f"{n} Ray worker{'s' if n > 1 else ''}", cfg, n, args.ray_address))
        print(json.dumps(results[-1]), flush=True)
    ref = results[0]
    for r in results:
        r["scored_tok_s_ratio"] = round(r["scored_tok_s"] / ref["scored_tok_s"], 2)
        r["wall_ratio"] = round(ref["wall_s"] / r["wall_s"], 2)
    lines = [f"{args.samples} samples, top-{args.top_k}, {os.cpu_count()} CPUs, teacher {teacher}, dtype {args.dtype}",
             "", "| setting | partitions | wall s (engine starts incl.) | engine start s | scored tok/s | tok/s vs "
             "in-process | wall speed-up |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['setting']} | {r['partitions']} | {r['wall_s']} | {r['engine_start_s']} | "
                     f"{r['scored_tok_s']:.0f} | {r['scored_tok_s_ratio']:.2f}x | {r['wall_ratio']:.2f}x |")  # fmt: skip
    md = "\n".join(lines)
    write_results("cache_scaling", results, md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
