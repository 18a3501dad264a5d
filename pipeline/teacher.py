"""Teacher scoring through vLLM: top-k logprobs (or sampled targets) over every response token, into the cache.

    python -m pipeline.teacher                                  # toy teacher, top-64, data/cache
    python -m pipeline.teacher --targets sampled --draws 12     # RS-KD: 12 ids drawn per position, ids + counts
    python -m pipeline.teacher --teacher Qwen/Qwen2.5-7B-Instruct --responses teacher --dtype bfloat16
    python -m pipeline.teacher --partitions 8 --partition 3     # one worker's share of an 8-partition cache

For each sample the prompt is rendered with the teacher's chat template; the
response is the sample's own or, with `--responses teacher`, written by the
teacher (greedy by default). Prompt + response are scored teacher-forced with
`prompt_logprobs=k` and the response positions, the end-of-turn token included,
are cached. With `--targets sampled` vLLM returns, in place of the top-k, N ids
drawn from the teacher's full distribution (pipeline.response_scoring).
Requests go to vLLM in large groups so its scheduler batches them. Samples
longer than the context are rejects (or, with `--too-long truncate`, their
response is cut), never a crash. The engine is pipeline.engine's; the summaries
are pipeline.teacher_report's.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.cache import (
    CacheEncoding,
    CacheWriter,
    ScoredSample,
    encode,
    open_cache_layout,
    partition_dir,
    partition_of,
)
from pipeline.chat import encode_pair, encode_prompt
from pipeline.config import ConfigError, parse_config
from pipeline.engine import LazyEngine, check_platform, resolve_dtype, resolve_max_model_len, vllm_version
from pipeline.errors import cli
from pipeline.fingerprint import (
    chat_template_sha256,
    content_sha256,
    local_model_dir,
    tokenizer_sha256,
    weights_sha256,
)
from pipeline.response_scoring import (
    DRAW_SEED_ARG,
    DRAW_TEMPERATURE_ARG,
    DRAWS_ARG,
    EXTRA_ARG,
    MEMORY_ARG,
)
from pipeline.parquet_io import reject, rejects_path, rejects_table, write_table_atomic
from pipeline.samples import load_samples
from pipeline.teacher_config import TeacherConfig
from pipeline.teacher_report import combine_summaries, format_summary, partition_summary


def teacher_fingerprint(model: str, tokenizer, top_k: int | None, responses: str, **setup) -> dict:
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


def generation_settings(cfg: TeacherConfig) -> dict | None:
    """What the teacher writes its responses from (None: the dataset's responses are scored)."""
    if cfg.responses != "teacher":
        return None
    return {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed if cfg.temperature > 0 else None}  # fmt: skip


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


def extract_response_logprobs(flat, n_prompt: int, n_response: int, k: int,
                              first_row: int = 0) -> tuple[np.ndarray, ...]:  # fmt: skip
    """From vLLM flat prompt logprobs: (token_logprobs (n,), topk_ids (n,k), topk_logprobs (n,k)).

    Entry j holds [the actual token first_row + j, then the top-k], each with its logprob given the tokens before
    it (entry 0 is vLLM's None). `first_row`: the prompt position of the output's first row - with response
    scoring (pipeline.response_scoring) the rows start at the position that predicts the first response token,
    n_prompt - 1; vLLM's own output has a row per position (0). The output's length is checked against it, so a
    row is never read from another position. Response tokens are n_prompt .. n_prompt+n_response-1.
    """
    if len(flat) != n_prompt + n_response - first_row:
        raise RuntimeError(f"vLLM returned prompt logprobs for {len(flat)} positions, expected "
                           f"{n_prompt + n_response - first_row} ({n_prompt} prompt + {n_response} response tokens, "
                           f"rows from position {first_row}): the engine does not score the way this stage asked; "
                           "is the response-scoring plugin applied (pipeline/response_scoring.py)?")  # fmt: skip
    first, last = n_prompt - first_row, n_prompt + n_response - 1 - first_row
    s, e = flat.start_indices[first], flat.end_indices[last]
    ids = np.asarray(flat.token_ids[s:e], dtype=np.int64).reshape(n_response, k + 1)
    lps = np.asarray(flat.logprobs[s:e], dtype=np.float32).reshape(n_response, k + 1)
    return lps[:, 0], ids[:, 1:], lps[:, 1:]


def _generate_responses(llm, tokenizer, group: list[dict], cfg: TeacherConfig) -> list[str]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        max_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed if cfg.temperature > 0 else None,
        skip_special_tokens=True,
    )
    prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, s["prompt"])) for s in group]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs]


@dataclass
class CacheSetup:
    """What every partition's writer shares: the tokenizer, the fingerprint, the encoding, the inputs."""

    tokenizer: object
    generation: dict | None
    fingerprint: dict
    encoding: CacheEncoding
    inputs: dict

    @classmethod
    def of(cls, cfg: TeacherConfig) -> "CacheSetup":
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        hf_config = AutoConfig.from_pretrained(cfg.model)
        generation = generation_settings(cfg)
        fingerprint = teacher_fingerprint(
            cfg.model, tokenizer, cfg.top_k if cfg.targets == "topk" else None, cfg.responses,
            dtype=resolve_dtype(cfg.dtype, cfg.model),
            max_model_len=resolve_max_model_len(cfg, hf_config), too_long=cfg.too_long, generation=generation,
            vllm=vllm_version(),
        )  # fmt: skip
        vocab = max(hf_config.vocab_size, len(tokenizer))
        if cfg.targets == "sampled":
            encoding = CacheEncoding(None, vocab, cfg.logprob_step, draws=cfg.draws,
                                     draw_temperature=cfg.draw_temperature, draw_seed=cfg.seed)  # fmt: skip
        else:
            encoding = CacheEncoding(cfg.top_k, vocab, cfg.logprob_step)
        inputs = {"samples_dir": str(cfg.samples_dir), "features_dir": str(cfg.features_dir),
                  "audio_dir": str(cfg.audio_dir), "teacher": cfg.model}
        return cls(tokenizer, generation, fingerprint, encoding, inputs)

    def open_layout(self, cfg: TeacherConfig) -> int:
        """Create or check the cache's layout (pipeline.cache.open_cache_layout); its partition count."""
        return open_cache_layout(cfg.out_dir, {**self.fingerprint, **self.encoding.to_dict()}, cfg.partitions,
                                 cfg.overwrite, self.inputs)  # fmt: skip


def prepare_cache(cfg: TeacherConfig) -> int:
    """Before workers start: the cache's layout created or checked once (overwrite included); its partitions."""
    return CacheSetup.of(check_platform(cfg.validate())).open_layout(cfg)


def cache_teacher_logits(cfg: TeacherConfig, progress: bool = True, llm=None) -> dict:
    """Score every not-yet-cached sample of cfg's partition(s) and append it to the cache; returns a summary.

    The cache's layout is created or checked first (`--partitions`); then each partition (all of them in turn,
    or `cfg.partition` alone: one worker's share) is appended to under its own lock. `llm`: an engine already
    made by `make_engine` for cfg.model (else one is started when there is work).
    """
    check_platform(cfg.validate())
    t_start = time.monotonic()
    samples = load_samples(cfg.samples_dir, cfg.split).to_pylist()
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    t_setup = time.monotonic()
    setup = CacheSetup.of(cfg)
    setup_s = time.monotonic() - t_setup
    for s in samples:
        s["content_sha256"] = content_sha256(s, setup.generation)
    n_parts = setup.open_layout(cfg)
    if cfg.partition is not None and cfg.partition >= n_parts:
        raise ConfigError(f"--partition {cfg.partition}: the cache at {cfg.out_dir} has {n_parts} partition(s), "
                          f"0..{n_parts - 1}")  # fmt: skip
    parts = [cfg.partition] if cfg.partition is not None else list(range(n_parts))
    shares: dict[int, list[dict]] = {p: [] for p in parts}
    for s in samples:
        share = shares.get(partition_of(s["sample_id"], n_parts))
        if share is not None:
            share.append(s)
    summaries = []
    with LazyEngine(cfg, llm) as engine:
        for p in parts:
            summaries.append(_cache_partition(cfg, p, n_parts, shares[p], setup, engine, progress))
    summary = combine_summaries(summaries, cfg.out_dir, time.monotonic() - t_start, engine.start_seconds,
                                setup_s=setup_s)  # fmt: skip
    if len(parts) == n_parts:
        (cfg.out_dir / "last_run.json").write_text(json.dumps(summary, indent=2))
    return summary


def _cache_partition(cfg: TeacherConfig, index: int, n_parts: int, samples: list[dict], setup: "CacheSetup",
                     engine: LazyEngine, progress: bool) -> dict:  # fmt: skip
    """Append this partition's samples not cached yet (or changed since) to its directory; its summary."""
    t_start = time.monotonic()
    engine_before = engine.start_seconds
    out = partition_dir(cfg.out_dir, index, n_parts)
    rejected: list[dict] = []
    stats = Counter()
    phases = Counter()  # seconds: scoring (vLLM), encode (extract + encode), write (shards + manifest)
    with CacheWriter(out, setup.fingerprint, setup.encoding, cfg.rows_per_shard, cfg.overwrite and n_parts == 1,
                     setup.inputs, verify=cfg.verify, partition=(index, n_parts)) as writer:  # fmt: skip
        # a cached sample whose content changed since (same id, edited prompt/response) is scored again
        stale = {s["sample_id"] for s in samples
                 if s["sample_id"] in writer.done and writer.done[s["sample_id"]] != s["content_sha256"]}  # fmt: skip
        stats["rescored"] = writer.remove(stale)
        todo = [s for s in samples if s["sample_id"] not in writer.done]
        stats["skipped"] = len(samples) - len(todo)
        if todo:
            where = f" {index}/{n_parts}" if n_parts > 1 else ""
            _score_and_store(todo, engine.get(), cfg, setup, writer, rejected, stats, phases,
                             tqdm(total=len(todo), desc=f"teacher cache{where}", unit="sample", disable=not progress))
        t = time.monotonic()
        writer.flush()
        phases["write"] += time.monotonic() - t
        suffix = f"-{out.name}" if n_parts > 1 else ""  # rejects/cache-partition-000i.parquet
        write_table_atomic(rejects_table(rejected), rejects_path(cfg.out_dir, "cache", suffix))
        summary = partition_summary(cfg, len(samples), stats, rejected, writer, time.monotonic() - t_start,
                           engine.start_seconds - engine_before)  # fmt: skip
    summary.update(partition=index, partitions=n_parts, phase_seconds={k: round(v, 2) for k, v in phases.items()})
    if n_parts > 1:
        (out / "last_run.json").write_text(json.dumps(summary, indent=2))
    return summary


def _score_and_store(todo: list[dict], llm, cfg: TeacherConfig, setup: "CacheSetup", writer: CacheWriter,
                     rejected: list, stats: Counter, phases: Counter, bar) -> None:  # fmt: skip
    """Score the samples group by group; a group's encode + write runs on one thread, in order, while the next
    group is scored. Leaving the executor waits for it, so the writer's lock is never released under a write."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    max_model_len = llm.llm_engine.model_config.max_model_len
    max_len = max_model_len - 1  # vLLM must have room to generate one token after the scored ones
    per_position = setup.encoding.per_position
    # vLLM reads no prefix cache for a request with prompt logprobs unless told to; response scoring caps the hits at
    # the first response position (pipeline/response_scoring.py), so it may
    reads_prefix_cache = cfg.scoring == "response" and cfg.prefix_cache
    score_params = SamplingParams(max_tokens=1, prompt_logprobs=per_position, detokenize=False, flat_logprobs=True,
                                  skip_reading_prefix_cache=not reads_prefix_cache)  # fmt: skip
    in_flight = None
    with ThreadPoolExecutor(1, thread_name_prefix="cache-write") as storing, bar:
        for start in range(0, len(todo), cfg.group_size):
            group = [dict(s) for s in todo[start : start + cfg.group_size]]
            if cfg.responses == "teacher":
                for s, text in zip(group, _generate_responses(llm, setup.tokenizer, group, cfg)):
                    s["response"] = text
            pairs, ready = [], []
            for s in group:
                pair = _encode_or_reject(s, setup.tokenizer, cfg, max_len, max_model_len, rejected, stats)
                if pair is not None:
                    pairs.append(pair)
                    ready.append(s)
            if pairs:
                params = score_params
                if cfg.scoring == "response" or setup.encoding.draws:
                    params = [score_params.clone() for _ in pairs]
                    for p, pair, s in zip(params, pairs, ready):
                        p.extra_args = request_args(cfg, setup.encoding, len(pair.prompt_ids), s["content_sha256"])
                t = time.monotonic()
                outs = llm.generate([TokensPrompt(prompt_token_ids=p.input_ids) for p in pairs], params,
                                    use_tqdm=False)  # fmt: skip
                phases["scoring"] += time.monotonic() - t
                stats["prefix_cached"] += check_prefix_hits(outs, pairs, ready, reads_prefix_cache)
                if in_flight is not None:
                    in_flight.result()  # at most one group being stored; its error surfaces here
                in_flight = storing.submit(_store_group, writer, ready, pairs, outs, per_position, setup.encoding,
                                           stats, phases, cfg.scoring == "response")  # fmt: skip
            bar.update(len(group))
            bar.set_postfix(tokens=stats["tokens"], rejects=len(rejected))
        if in_flight is not None:
            in_flight.result()


def first_scored_row(pair, response_scoring: bool) -> int:
    """The first prompt position this stage has vLLM score: with response scoring the one that predicts the first
    response token (request_args asks for it; vLLM's output starts there), else 0. Worked out from the sample, not
    read back from the plugin, so the engine's output is checked against what was asked."""
    return len(pair.prompt_ids) - 1 if response_scoring else 0


def check_prefix_hits(outs: list, pairs: list, samples: list[dict], response_scoring: bool) -> int:
    """The prompt tokens vLLM took from its prefix cache for these outputs; raises if a hit covered a scored
    position (its row would be empty): past the position before the first response token with response scoring,
    any hit without it."""
    total = 0
    for o, pair, s in zip(outs, pairs, samples):
        hit = o.num_cached_tokens or 0
        allowed = first_scored_row(pair, response_scoring)
        if hit > allowed:
            raise RuntimeError(f"vLLM reused {hit} cached tokens of sample {s['sample_id']!r}, past its first scored "
                               f"position {allowed}: its rows would not be scored. The prefix-cache cap of "
                               f"pipeline/response_scoring.py is not in effect in the engine; rerun with "
                               f"--no-prefix-cache")  # fmt: skip
        total += hit
    return total


def request_args(cfg: TeacherConfig, encoding: CacheEncoding, n_prompt: int, content: str) -> dict:
    """A scoring request's `extra_args` for pipeline.response_scoring: the memory an LM-head batch may hold, where
    its scored positions start (response scoring), and its draws (sampled targets), seeded by --seed and the
    sample's content alone."""
    args = {MEMORY_ARG: int(cfg.logprobs_memory_gib * (1 << 30))}
    if cfg.scoring == "response":
        args[EXTRA_ARG] = n_prompt
    if encoding.draws:
        seed = int.from_bytes(hashlib.sha256(f"{encoding.draw_seed}|{content}".encode()).digest()[:8], "big") >> 1
        args.update({DRAWS_ARG: encoding.draws, DRAW_TEMPERATURE_ARG: encoding.draw_temperature, DRAW_SEED_ARG: seed})
    return args


def _store_group(writer: CacheWriter, ready: list[dict], pairs: list, outs: list, per_position: int,
                 encoding: CacheEncoding, stats: Counter, phases: Counter, response_scoring: bool) -> None:  # fmt: skip
    """A scored group's rows, encoded and appended (the writer flushes a shard when it is full)."""
    for s, pair, o in zip(ready, pairs, outs):
        t = time.monotonic()
        n = len(pair.response_ids)
        token_lp, topk_ids, topk_lp = extract_response_logprobs(o.prompt_logprobs, len(pair.prompt_ids), n,
                                                                per_position, first_scored_row(pair, response_scoring))  # fmt: skip
        row = encode(ScoredSample(s["sample_id"], s["response"], np.asarray(pair.response_ids), token_lp, topk_ids,
                                  topk_lp, s["content_sha256"]), encoding)  # fmt: skip
        t2 = time.monotonic()
        writer.add(row)
        phases["encode"] += t2 - t
        phases["write"] += time.monotonic() - t2
        stats["cached"] += 1
        stats["tokens"] += n
        stats["tokens_scored"] += len(pair.input_ids)


def _encode_or_reject(s: dict, tokenizer, cfg: TeacherConfig, max_len: int, max_model_len: int, rejected: list,
                      stats: Counter):  # fmt: skip
    """The sample's (prompt, response) token ids to score, or None after recording why it is a reject."""
    sid = s["sample_id"]
    special = special_token_problem(tokenizer, s)
    if special:
        rejected.append(reject("cache", special[0], special[1], sample_id=sid))
        return None
    if not s["response"]:
        why = "empty after the teacher wrote it" if cfg.responses == "teacher" else (
            "empty: the cache scores a response; give one, or pass --responses teacher")
        rejected.append(reject("cache", "response", why, sample_id=sid))
        return None
    pair = encode_pair(tokenizer, s["prompt"], s["response"])
    total = len(pair.prompt_ids) + len(pair.response_ids)
    if total > max_len:
        keep = max_len - len(pair.prompt_ids)
        if cfg.too_long == "truncate" and keep >= 1:
            stats["truncated"] += 1
            return type(pair)(pair.prompt_ids, pair.response_ids[:keep])
        field_ = "prompt" if len(pair.prompt_ids) >= max_len else "response"
        rejected.append(reject("cache", field_, (
            f"too long: {len(pair.prompt_ids)} prompt + {len(pair.response_ids)} response tokens > "
            f"{max_len} (max_model_len {max_model_len} less the 1 token vLLM generates; raise "
            "--max-model-len or pass --too-long truncate)"), sample_id=sid))  # fmt: skip
        return None
    return pair


@cli("pipeline.teacher")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TeacherConfig, argv, description=__doc__)
    print(format_summary(cache_teacher_logits(cfg.validate())))


if __name__ == "__main__":
    sys.exit(main())
