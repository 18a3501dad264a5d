"""The caching stage's report: one summary per partition, their combination, and the lines users read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cache import cache_shards

if TYPE_CHECKING:
    from pipeline.cache import CacheWriter
    from pipeline.teacher_config import TeacherConfig


def partition_summary(cfg: TeacherConfig, n_samples: int, stats: Counter, rejected: list, writer: CacheWriter,
             elapsed: float, engine_s: float) -> dict:  # fmt: skip
    reasons = Counter(r["reason"].split(":")[0] for r in rejected)
    return {
        "cache_dir": str(cfg.out_dir),
        "samples": n_samples,
        "cached_now": stats["cached"],
        "already_cached": stats["skipped"],
        "rescored_changed": stats["rescored"],
        "rejected": len(rejected),
        "rejects_by_reason": dict(reasons),
        "truncated": stats["truncated"],
        "tokens_generated": stats["generated"],
        "responses_cut": stats["responses_cut"],
        "tokens_cached": stats["tokens"],
        "tokens_scored": stats["tokens_scored"],
        "prompt_tokens_from_prefix_cache": stats["prefix_cached"],
        "seconds": round(elapsed, 2),
        "engine_start_seconds": round(engine_s, 2),
        "scoring_seconds": round(elapsed - engine_s, 2),
        "bytes_written": writer.bytes_written,
        "top_k": cfg.top_k,
        "targets": targets_label(cfg),
        "responses": cfg.responses_mode,
        "turns": cfg.turns,
    }


def targets_label(cfg: TeacherConfig) -> str:
    """What the cache holds per position, in words: `top-64` or `sampled 12 @ T=1.0`."""
    return f"top-{cfg.top_k}" if cfg.targets == "topk" else f"sampled {cfg.draws} @ T={cfg.draw_temperature:g}"


SUMMED = ("samples", "cached_now", "already_cached", "rescored_changed", "rejected", "truncated", "tokens_generated",
          "responses_cut", "tokens_cached",
          "tokens_scored", "prompt_tokens_from_prefix_cache", "bytes_written", "engine_start_seconds")  # fmt: skip


def combine_summaries(parts: list[dict], cache_dir: Path, seconds: float, engine_s: float,
                      parallel: bool = False, setup_s: float = 0.0) -> dict:  # fmt: skip
    """One summary of partition summaries: counts summed; tokens/s over the scoring time (the partitions' sum
    when they ran one after the other, the slowest one's when they ran `parallel`; engine starts excluded);
    the cache's size now."""
    out = {key: sum(p.get(key, 0) for p in parts) for key in SUMMED}
    reasons = Counter()
    for p in parts:
        reasons.update(p["rejects_by_reason"])
    phases = Counter({"setup": setup_s})
    for p in parts:
        phases.update(p.get("phase_seconds", {}))
    times = [p["scoring_seconds"] for p in parts]
    scoring = (max(times) if parallel else sum(times)) if times else 0.0
    shards = cache_shards(cache_dir)
    out.update(
        cache_dir=str(cache_dir), rejects_by_reason=dict(reasons), seconds=round(seconds, 2),
        engine_start_seconds=round(engine_s if not parallel else max(p["engine_start_seconds"] for p in parts), 2),
        scoring_seconds=round(scoring, 2), tokens_per_second=round(out["tokens_scored"] / max(scoring, 1e-9), 1),
        cache_rows=sum(e["rows"] for _, e in shards), cache_bytes=sum(e["bytes"] for _, e in shards),
        bytes_per_cached_token=round(out["bytes_written"] / out["tokens_cached"], 1) if out["tokens_cached"] else None,
        top_k=parts[0]["top_k"] if parts else None, responses=parts[0]["responses"] if parts else None,
        targets=parts[0].get("targets") if parts else None,
        phase_seconds={"engine_start": out["engine_start_seconds"], **{k: round(v, 2) for k, v in phases.items()}},
        partitions=parts[0]["partitions"] if parts else 1, partitions_run=[i for p in parts for i in p.get("partitions_run", [p.get("partition")])],
    )  # fmt: skip
    return out


def format_summary(s: dict) -> str:
    bpt = f", {s['bytes_per_cached_token']} B/token" if s["bytes_per_cached_token"] else ""
    hits = s.get("prompt_tokens_from_prefix_cache") or 0
    reused = f" ({hits} of {s['tokens_scored']} from the prefix cache)" if hits else ""
    return (
        f"teacher cache: {s['cached_now']} samples cached now ({s.get('rescored_changed', 0)} of them re-scored: "
        f"their content changed since cached), {s['already_cached']} already there, "
        f"{s['rejected']} rejected; {s['tokens_cached']} response tokens, {s['tokens_per_second']:.0f} tok/s scored"
        f"{reused}{bpt} -> {s['cache_dir']} ({s['cache_rows']} rows)" + format_phases(s.get("phase_seconds"))
        + format_written(s)
    )


def format_written(s: dict) -> str:
    """What the teacher wrote, when it wrote the responses: tokens, and how many responses reached
    --max-new-tokens (cached as written: without an end of turn)."""
    if not s.get("tokens_generated"):
        return ""
    cut = s.get("responses_cut") or 0
    note = (f"; {cut} reached --max-new-tokens and are cached without an end of turn (raise --max-new-tokens)"
            if cut else "")  # fmt: skip
    return f"\nthe teacher wrote {s['tokens_generated']} tokens ({s['responses']}){note}"


def format_phases(phases: dict | None) -> str:
    """Seconds per phase (summed over workers when they ran in parallel; encode + write overlap scoring). setup:
    loading the tokenizer and config and hashing the teacher for the fingerprint (imports included)."""
    if not phases or not any(phases.values()):
        return ""
    names = ("setup", "engine_start", "scoring", "encode", "write")
    return "; seconds: " + ", ".join(f"{n.replace('_', ' ')} {phases[n]:.1f}" for n in names if n in phases)
