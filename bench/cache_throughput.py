"""Throughput and size of the teacher-caching stage, side by side in one run.

    python -m bench.cache_throughput                 # ~10 min on 2 CPU cores
    python -m bench.cache_throughput --samples 300 --dtypes float32

For each model (a ~50M-parameter Llama with a 32k vocabulary and random weights,
and the embedded toy teacher) and each dtype, on the same toy-world samples:
  (a) the whole caching stage: vLLM flat prompt logprobs + encode + Parquet write
  (b) vLLM with default (non-flat) prompt_logprobs, top-k taken out into arrays
  (c) transformers forward + log_softmax + topk, batched, same dtype
  (s) the whole stage with sampled targets (--targets sampled --draws N, RS-KD) instead of the top-k
  (p) vLLM's forward alone: prefill with no prompt logprobs and no prefix-cache reads (max_tokens=1), the ceiling
      of any scoring that recomputes every prompt
Tokens/s count every scored token (prompt + response); engine start and model
load are excluded (reported apart). Each round runs every measurement once, in
turn, with the transformers model loaded beside the engine; the first round is
a warm-up, the others give each column's median and each ratio's median and
range (a ratio within one round, so the machine's drift between minutes
cancels). Also: bytes per cached response token at k, and the error of the
decoded logprobs against vLLM's exact float32 values.
Writes bench/results/cache_throughput.{json,md} (bench.report) and prints the table.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.common import WORK, toy_samples, toy_teacher
from bench.report import read_results, stamp, write_results
from pipeline.cache import CacheReader
from pipeline.chat import encode_pair
from pipeline.config import listed, opt, parse_config
from pipeline.engine import make_engine
from pipeline.samples import ingest, load_samples
from pipeline.teacher import cache_teacher_logits
from pipeline.teacher_config import TeacherConfig
RATIOS = (("a", "a_full"), ("a", "c"), ("a", "b"), ("p", "b"))  # reported as <x>_over_<y>: a median and a range


def build_random_llama(out: Path, tokenizer_dir: Path, vocab: int = 32000) -> Path:
    """~50M-parameter Llama, 32k vocab, random weights, with the toy tokenizer and chat template."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.eos_token_id)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_transformers(model_dir: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()


def bench_transformers(model, pairs, k: int, batch_size: int = 32) -> dict:
    pad = 0
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            width = max(len(p.input_ids) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):
                ids[r, : len(p.input_ids)] = torch.tensor(p.input_ids)
                mask[r, : len(p.input_ids)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            for r, p in enumerate(chunk):
                n0, n = len(p.prompt_ids), len(p.response_ids)
                lp = torch.log_softmax(logits[r, n0 - 1 : n0 - 1 + n].float(), dim=-1)
                top = lp.topk(k, dim=-1)
                _ = (top.indices.numpy(), top.values.numpy(), lp.gather(1, torch.tensor(p.response_ids)[:, None]))
                tokens += len(p.input_ids)
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_vllm_default(llm, pairs, k: int) -> tuple[dict, list]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)  # flat_logprobs=False: the default
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p.input_ids) for p in pairs], params, use_tqdm=False)
    exact = []
    for p, out in zip(pairs, outs):
        n0, n = len(p.prompt_ids), len(p.response_ids)
        ids = np.zeros((n, k), dtype=np.int64)
        lps = np.zeros((n, k), dtype=np.float32)
        for t, pos in enumerate(out.prompt_logprobs[n0 : n0 + n]):
            ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in pos.items() if lp.rank <= k))
            # the actual token may also appear at its own rank; keep ranks 1..k once
            seen = {}
            for rank, tid, value in ranked:
                seen.setdefault(rank, (tid, value))
            for rank in range(1, k + 1):
                ids[t, rank - 1], lps[t, rank - 1] = seen[rank]
        exact.append((ids, lps))
    seconds = time.perf_counter() - t0
    tokens = sum(len(p.input_ids) for p in pairs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}, exact


def bench_vllm_forward(llm, pairs) -> dict:
    """(p): the prefill alone (one token generated, no prompt logprobs, no prefix-cache reads)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, detokenize=False, skip_reading_prefix_cache=True)
    t0 = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p.input_ids) for p in pairs], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(p.input_ids) for p in pairs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def prompt_heavy_samples(src: Path, out: Path, context_facts: int, shared: bool = False) -> Path:
    """The toy samples with `context_facts` other samples' question + answer before each question: a
    prompt-heavy set (system prompt / retrieved context, then a short answer), as real KD data is. `shared`: the
    same facts (the first ones) before every question, as a system prompt or a fixed document is; else each
    sample's own (the next samples')."""
    if (out / "samples.parquet").exists():
        return out
    rows = load_samples(src).to_pylist()
    lines = []
    for i, r in enumerate(rows):
        ctx = " ".join(f"{c['prompt']} {c['response']}." for c in (rows[(j if shared else i + j + 1) % len(rows)]
                                                                   for j in range(context_facts)))  # fmt: skip
        lines.append(json.dumps({"sample_id": r["sample_id"], "prompt": f"Context: {ctx} Question: {r['prompt']}",
                                 "response": r["response"], "split": r["split"]}))  # fmt: skip
    raw = out.parent / f"{out.name}.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("\n".join(lines) + "\n")
    ingest(str(raw), out, progress=False)
    return out


def fresh(llm, path: Path | None = None) -> None:
    """Before a measurement: its output directory removed, vLLM's prefix cache emptied."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
    llm.reset_prefix_cache()


def run_model(name: str, model_dir: Path, samples_dir: Path, n: int, k: int, dtype: str, draws: int = 12,
              block_size: int | None = None, rounds: int = 4, max_batched_tokens: int | None = None) -> dict:  # fmt: skip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = load_samples(samples_dir).to_pylist()[:n]
    pairs = [encode_pair(tok, r["prompt"], r["response"]) for r in rows]
    t0 = time.perf_counter()
    engine = TeacherConfig(teacher=str(model_dir), dtype=dtype, kv_cache_gib=1.0, samples=str(samples_dir), top_k=k,
                           block_size=block_size, max_batched_tokens=max_batched_tokens)  # fmt: skip
    llm = make_engine(engine)
    step = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    engine_s = time.perf_counter() - t0
    out = WORK / "cache" / f"{name}-{dtype}"
    # warm-up (a fresh cache, or nothing would be scored): the first prompt-logprob call compiles vLLM's
    # rank count with torch.compile (~2.3 s here), which must not land in the first measurement
    shutil.rmtree(WORK / "cache" / "warmup", ignore_errors=True)
    cache_teacher_logits(replace(engine, out=str(WORK / "cache" / "warmup"), limit=32), progress=False, llm=llm)
    # Every measurement runs once per round, all of them in turn (see `measured` below); each starts from an empty
    # prefix cache (reuse within a run counts, reuse of an earlier run's does not).
    full_out = WORK / "cache" / f"{name}-{dtype}-full"
    sampled_out = WORK / "cache" / f"{name}-{dtype}-sampled{draws}"
    model = load_transformers(model_dir, dtype)  # (c) beside the engine, so that its runs interleave with vLLM's
    per_round = []  # tokens/s of each measurement, one dict per round
    for _ in range(rounds):
        m = {}
        fresh(llm, out)
        a = cache_teacher_logits(replace(engine, out=str(out), limit=n), progress=False, llm=llm)
        m["a"] = a["tokens_per_second"]
        fresh(llm, full_out)
        m["a_full"] = cache_teacher_logits(replace(engine, out=str(full_out), limit=n, scoring="full"),
                                           progress=False, llm=llm)["tokens_per_second"]  # fmt: skip
        sampled = None
        if draws:
            fresh(llm, sampled_out)
            sampled = cache_teacher_logits(replace(engine, out=str(sampled_out), limit=n, targets="sampled",
                                                   draws=draws), progress=False, llm=llm)  # fmt: skip
            m["s"] = sampled["tokens_per_second"]
        fresh(llm)
        b, exact = bench_vllm_default(llm, pairs, k)
        m["b"] = b["tokens_per_s"]
        fresh(llm)
        m["p"] = bench_vllm_forward(llm, pairs)["tokens_per_s"]
        m["c"] = bench_transformers(model, pairs, k)["tokens_per_s"]
        print(f"  round {len(per_round) + 1}/{rounds}: " + ", ".join(f"{key} {v:.0f}" for key, v in m.items()),
              flush=True)  # fmt: skip
        per_round.append(m)
    del llm, model
    # The first round is a warm-up when there are more: the first pass over the samples runs slower in a process
    # whatever is measured (allocator, page faults, oneDNN's primitives: the same measurement three times in a row ran ~15%
    # faster each time). Reported: each column's median over the other rounds, and each ratio's median and range over them
    # (a ratio of two measurements of the same round: this machine drifts by +-10-15% between minutes).
    measured = per_round[1:] if rounds > 1 else per_round

    def median(key: str) -> float:
        return round(float(np.median([m[key] for m in measured])), 1)

    ratios = {}  # <x>_over_<y>: the median of the per-round ratios; <x>_over_<y>_range: [min, max]
    for x, y in RATIOS:
        r = [m[x] / m[y] for m in measured]
        ratios[f"{x}_over_{y}"] = round(float(np.median(r)), 2)
        ratios[f"{x}_over_{y}_range"] = [round(min(r), 2), round(max(r), 2)]

    # fidelity of what the cache decodes, against vLLM's exact values for the same tokens
    reader = CacheReader(out)
    decoded = {sid: r for sid, r in ((r["sample_id"], reader.decode_row(r)) for r in reader.iter_rows())}
    errs, id_match = [], []
    for r, (ids, lps) in zip(rows, exact):
        d = decoded[r["sample_id"]]
        id_match.append((d["topk_ids"] == ids).mean())
        errs.append(np.abs(d["topk_logprobs"] - lps).ravel())
    errs = np.concatenate(errs)
    return {
        "model": name,
        "dtype": dtype,
        "k": k,
        "samples": n,
        "engine_start_s": round(engine_s, 1),
        "prompt_to_response_tokens": round(sum(len(p.prompt_ids) for p in pairs) / sum(len(p.response_ids)
                                                                                   for p in pairs), 2),
        "a_stage_tok_s": median("a"),
        "a_tokens_scored": a["tokens_scored"],
        "a_phase_seconds": a["phase_seconds"],
        "a_full_scoring_tok_s": median("a_full"),
        "b_vllm_default_tok_s": median("b"),
        "c_transformers_tok_s": median("c"),
        "p_forward_only_tok_s": median("p"),
        **ratios,
        "prompt_tokens_from_prefix_cache": a["prompt_tokens_from_prefix_cache"],
        "block_size": block_size,
        "engine_step_tokens": step,
        "rounds": rounds,
        "rounds_measured": len(measured),
        "per_round_tok_s": per_round,
        "bytes_per_cached_token": a["bytes_per_cached_token"],
        "draws": draws or None,
        "s_sampled_tok_s": median("s") if sampled else None,
        "s_bytes_per_cached_token": sampled["bytes_per_cached_token"] if sampled else None,
        "response_tokens": a["tokens_cached"],
        "decode_mae_nats": float(errs.mean()),
        "decode_max_err_nats": float(errs.max()),
        "topk_id_agreement": float(np.mean(id_match)),
    }


def format_ratio(r: dict, key: str) -> str:
    """'1.48x (1.41-1.52)': a ratio's median and range over the measured rounds (rows of older runs: the value)."""
    if r.get(key) is None:
        return "-"
    spread = r.get(f"{key}_range")
    return f"{r[key]:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")


@dataclass
class CacheThroughputBench:
    samples: int = opt(800, "toy-world samples per measurement")
    top_k: int = opt(64, "logprobs kept per position")
    draws: int = opt(12, "(s): sampled targets with N draws (0: skip)")
    dtypes: list[str] = listed(("float32", "bfloat16"), "dtypes to measure")
    models: list[str] = listed(("llama50m-32k", "toy-teacher"), "models to measure")
    prompt_heavy: int = opt(0, "put this many other question+answer pairs before each question (2 gives "
                               "prompt:response tokens of ~4:1 on the toy world)")  # fmt: skip
    shared_context: bool = opt(False, "with --prompt-heavy: the same facts before every question (a system prompt or "
                                      "a fixed document, which vLLM's prefix cache can reuse), instead of each "
                                      "sample's own")  # fmt: skip
    block_size: int | None = opt(None, "vLLM's KV block size (default: vLLM's)")
    max_batched_tokens: int | None = opt(None, "the engine's tokens per step (default: the stage's, vLLM's default for "
                                               "the device). (b) computes prompt logprobs over a whole step at once: "
                                               "on a GPU with a 152k vocabulary a 16384-token step needs ~15 GB for "
                                               "them, so cap it there (e.g. 2048)")  # fmt: skip
    rounds: int = opt(4, "rounds of all the measurements in turn; the first is a warm-up, the others give each "
                         "column's median and each ratio's median and range")  # fmt: skip


def table(results: list[dict], top_k: int, rounds: int) -> str:
    lines = ["| model | dtype | prompt:response | (a) stage tok/s | (a') stage, --scoring full | (b) vLLM default tok/s "
             "| (c) transformers tok/s | (p) vLLM forward only | a/a' | a/c | a/b | p/b | prompt tokens reused "
             f"| bytes/token (k={top_k}) | decode MAE (nats) | max err | (s) sampled N tok/s | bytes/token (sampled N) "
             "| measured |", "|---" * 19 + "|"]  # fmt: skip
    for r in results:
        if "a_full_scoring_tok_s" not in r:
            continue  # a row of an earlier run, before --scoring
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['prompt_to_response_tokens']}:1 | {r['a_stage_tok_s']:.0f} | "
            f"{r['a_full_scoring_tok_s']:.0f} | {r['b_vllm_default_tok_s']:.0f} | {r['c_transformers_tok_s']:.0f} | "
            f"{r.get('p_forward_only_tok_s') or '-'} | "
            + " | ".join(format_ratio(r, f"{x}_over_{y}") for x, y in RATIOS) + " | "
            f"{r.get('prompt_tokens_from_prefix_cache', '-')} / {r.get('a_tokens_scored', '-')} | "
            f"{r['bytes_per_cached_token']} | {r['decode_mae_nats']:.4f} | {r['decode_max_err_nats']:.4f} | "
            f"{r.get('s_sampled_tok_s') or '-'} | {r.get('s_bytes_per_cached_token') or '-'}"
            f"{' (N=%d)' % r['draws'] if r.get('draws') else ''} | {r.get('run', {}).get('date', '-')} |")  # fmt: skip
    lines.append("")
    lines.append(f"Ratios: the median over the rounds after the first (a warm-up), range in brackets ({rounds} rounds "
                 f"in the latest run). Rows of other models and dtypes are kept from earlier runs (their date is in "
                 f"the last column).")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_config(CacheThroughputBench, argv, description=__doc__)
    torch.set_num_threads(torch.get_num_threads())
    samples_dir = toy_samples(WORK / "samples")
    teacher = toy_teacher(samples_dir)
    context = ""
    if args.prompt_heavy:
        context = f"+{'shared' if args.shared_context else ''}context{args.prompt_heavy}"
        samples_dir = prompt_heavy_samples(samples_dir, WORK / f"samples{context[1:].replace('+', '-')}",
                                           args.prompt_heavy, args.shared_context)  # fmt: skip
    models = {"llama50m-32k": lambda: build_random_llama(WORK / "llama50m-32k", teacher), "toy-teacher": lambda: teacher}
    run = stamp(argv)
    results = []
    for name in args.models:
        model_dir = models[name]()
        for dtype in args.dtypes:
            label = name + context + (f"+block{args.block_size}" if args.block_size else "")
            r = run_model(label, model_dir, samples_dir, args.samples, args.top_k, dtype, args.draws,
                          args.block_size, args.rounds, args.max_batched_tokens)  # fmt: skip
            r["run"] = {"date": run["date"], "commit": run["commit"]}
            print(json.dumps(r), flush=True)
            results.append(r)
    # Keep rows of other (model, dtype, k) from earlier runs; this run's replace their own.
    key = lambda r: (r["model"], r["dtype"], r["k"])  # noqa: E731
    mine = {key(r) for r in results}
    results = [r for r in read_results("cache_throughput") if key(r) not in mine] + results
    md = table(results, args.top_k, args.rounds)
    write_results("cache_throughput", results, md, run)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
