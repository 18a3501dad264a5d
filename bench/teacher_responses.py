"""Teacher-written responses, one pass against two, side by side in one run.

    python -m bench.teacher_responses                       # ~10 min on 2 CPU cores
    python -m bench.teacher_responses --samples 32 --min-new-tokens 100 --max-new-tokens 128

For each model (a ~50M-parameter Llama with a 32k vocabulary and random weights, and the embedded toy teacher),
the caching stage with `--responses teacher` (one pass: the top-k of each generated token taken as it is generated)
and `--responses teacher-rescored` (generate, then score the written ids with prompt logprobs: DistillKit's way,
and what sampled targets need), on the same toy-world prompts, greedy. The toy teacher ends its answers after ~10
tokens: `--min-new-tokens` holds its end of turn back (vLLM's min_tokens; the cached top-k are the raw
distribution's), so every response is as long as a real assistant's. Measured: response tokens written and cached
per second of the stage's scoring time (engine start excluded), per round; each round runs both, in turn, from an
empty prefix cache; the first round is a warm-up, the others give each column's median and the ratio's median and
range (within a round, so the machine's drift cancels). Also checked: both caches hold the same ids, and their
top-k agree within the encoding's error; and how many of the written responses the earlier path (decode, strip,
re-tokenize, score) would have changed: their ids are not the re-tokenized decoded text's.
Writes bench/results/teacher_responses.{json,md} (bench.report) and prints the table.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.cache_throughput import build_random_llama, fresh
from bench.common import WORK, toy_samples, toy_teacher
from bench.report import read_results, stamp, write_results
from pipeline.cache import CacheReader
from pipeline.config import listed, opt, parse_config
from pipeline.engine import make_engine
from pipeline.teacher import cache_teacher_logits
from pipeline.teacher_config import TeacherConfig

MODES = ("teacher", "teacher-rescored")


@dataclass
class TeacherResponsesBench:
    """`python -m bench.teacher_responses`"""

    samples: int = opt(32, "prompts per measurement")
    top_k: int = opt(20, "top-k cached per position")
    max_new_tokens: int = opt(128, "longest response written")
    min_new_tokens: int = opt(100, "shortest response written (the end of turn held back until then)")
    models: list[str] = listed(("llama50m-32k", "toy-teacher"), "models to measure")
    dtype: str = opt("float32", "the engine's dtype")
    rounds: int = opt(3, "rounds of both measurements; the first is a warm-up when there are more")


def _rows(cache: Path) -> dict:
    reader = CacheReader(cache)
    return {r["sample_id"]: reader.decode_row(r) for r in reader.iter_rows()}


def _retokenized_differently(model_dir: Path, rows: dict) -> int:
    """Responses whose written ids the earlier two-pass path would not have scored: decoded, stripped and
    re-tokenized, they come back as other ids (the end-of-turn token set aside, as that path appended it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    changed = 0
    for r in rows.values():
        ids = [int(t) for t in r["token_ids"] if int(t) not in special]
        again = tok(tok.decode(ids, skip_special_tokens=True).strip(), add_special_tokens=False).input_ids
        changed += again != ids
    return changed


def run_model(name: str, model_dir: Path, samples_dir: Path, args: TeacherResponsesBench) -> dict:
    t0 = time.perf_counter()
    engine = TeacherConfig(teacher=str(model_dir), dtype=args.dtype, kv_cache_gib=1.0, samples=str(samples_dir),
                           top_k=args.top_k, limit=args.samples, responses="teacher", temperature=0.0,
                           max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)  # fmt: skip
    llm = make_engine(engine)
    engine_s = time.perf_counter() - t0
    outs = {mode: WORK / "cache" / f"responses-{name}-{mode}" for mode in MODES}
    per_round, last = [], {}
    for _ in range(args.rounds):
        m = {}
        for mode in MODES:
            fresh(llm, outs[mode])
            s = cache_teacher_logits(replace(engine, out=str(outs[mode]), responses=mode), progress=False, llm=llm)
            m[mode] = s["tokens_cached"] / s["scoring_seconds"]
            last[mode] = s
        print(f"  round {len(per_round) + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in m.items()),
              flush=True)  # fmt: skip
        per_round.append(m)
    del llm
    measured = per_round[1:] if args.rounds > 1 else per_round
    ratio = [m["teacher"] / m["teacher-rescored"] for m in measured]
    one, two = _rows(outs["teacher"]), _rows(outs["teacher-rescored"])
    same_ids = all(one[s]["token_ids"].tolist() == two[s]["token_ids"].tolist() for s in one)
    err = max(float(np.abs(one[s]["token_logprobs"] - two[s]["token_logprobs"]).max()) for s in one)
    agree = float(np.mean([(one[s]["topk_ids"] == two[s]["topk_ids"]).mean() for s in one]))
    lengths = [len(r["token_ids"]) for r in one.values()]
    changed = _retokenized_differently(model_dir, one)
    return {
        "model": name, "dtype": args.dtype, "k": args.top_k, "samples": len(one),
        "engine_start_s": round(engine_s, 1),
        "response_tokens_mean": round(float(np.mean(lengths)), 1), "response_tokens_min": int(min(lengths)),
        "one_pass_tok_s": round(float(np.median([m["teacher"] for m in measured])), 1),
        "two_pass_tok_s": round(float(np.median([m["teacher-rescored"] for m in measured])), 1),
        "one_over_two": round(float(np.median(ratio)), 2), "one_over_two_range": [round(min(ratio), 2),
                                                                                  round(max(ratio), 2)],
        "phase_seconds": {mode: last[mode]["phase_seconds"] for mode in MODES},
        "retokenized_differently": changed,
        "same_ids": same_ids, "token_logprob_max_diff": round(err, 6), "topk_id_agreement": round(agree, 4),
        "rounds": args.rounds, "rounds_measured": len(measured), "per_round_tok_s": per_round,
    }  # fmt: skip


def table(results: list[dict]) -> str:
    lines = ["| model | dtype | k | samples | response tokens (mean, min) | one pass tok/s | two passes tok/s | "
             "one / two (range) | same ids | top-k id agreement | re-tokenized differently |", "|" + "---|" * 11]  # fmt: skip
    for r in results:
        lo, hi = r["one_over_two_range"]
        lines.append(f"| {r['model']} | {r['dtype']} | {r['k']} | {r['samples']} | {r['response_tokens_mean']}, "
                     f"{r['response_tokens_min']} | {r['one_pass_tok_s']:.0f} | {r['two_pass_tok_s']:.0f} | "
                     f"{r['one_over_two']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['same_ids']} | {r['topk_id_agreement']:.4f} | "
                     f"{r['retokenized_differently']}/{r['samples']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_config(TeacherResponsesBench, argv, description=__doc__)
    samples_dir = toy_samples(WORK / "samples")
    teacher = toy_teacher(samples_dir)
    models = {"llama50m-32k": lambda: build_random_llama(WORK / "llama50m-32k", teacher), "toy-teacher": lambda: teacher}
    run = stamp(argv)
    results = []
    for name in args.models:
        r = run_model(name, models[name](), samples_dir, args)
        r["run"] = {"date": run["date"], "commit": run["commit"]}
        print(json.dumps(r), flush=True)
        results.append(r)
    key = lambda r: (r["model"], r["dtype"], r["k"])  # noqa: E731
    mine = {key(r) for r in results}
    results = [r for r in read_results("teacher_responses") if key(r) not in mine] + results
    md = table(results)
    write_results("teacher_responses", results, md, run)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
