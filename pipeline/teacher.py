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
from pipeline.chat import EncodedConversation, TemplateMismatch, conversation, encode_conversation, to_score
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
    if not cfg.writes_responses:
        return None
    settings = {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
                "seed": cfg.seed if cfg.temperature > 0 else None}  # fmt: skip
    if cfg.min_new_tokens:  # recorded only when set: a cache made before the option keeps its content hashes
        settings["min_new_tokens"] = cfg.min_new_tokens
    return settings


def special_token_problem(tokenizer, sample: dict) -> tuple[str, str] | None:
    """(field, reason) when a turn's text contains a special token's text (e.g. a literal `<|end|>`): tokenized, it
    would become the real token (an end of turn mid-response, a turn marker in a prompt). Such samples are
    rejected rather than silently re-encoded. The field is the sample's (prompt, response) or a conversation's turn
    (messages[i].content)."""
    specials = sorted({t for t in tokenizer.all_special_tokens if t} | {t.content for t in
                       tokenizer.added_tokens_decoder.values() if t.special and t.content}, key=len, reverse=True)  # fmt: skip
    if sample.get("messages"):
        texts = [(f"messages[{i}].content", m["content"]) for i, m in enumerate(conversation(sample))]
    else:
        texts = [(name, sample.get(name) or "") for name in ("prompt", "response")]
    for field_, text in texts:
        for tok in specials:
            if tok in text:
                return field_, (f"contains the text of the special token {tok!r}, which the tokenizer would "
                                f"read as that token (a turn marker / end of turn); remove or rewrite it")  # fmt: skip
    return None


def span_logprobs(flat, n_tokens: int, spans: list[tuple[int, int]], k: int,
                  first_row: int = 0) -> tuple[np.ndarray, ...]:  # fmt: skip
    """From vLLM flat prompt logprobs over `n_tokens` tokens: (token_logprobs (n,), topk_ids (n,k), topk_logprobs
    (n,k)) of the tokens of `spans` ((start, length) each), in order.

    Entry j holds [the actual token first_row + j, then the top-k], each with its logprob given the tokens before
    it (entry 0 is vLLM's None). `first_row`: the position of the output's first row - with response scoring
    (pipeline.response_scoring) the rows start at the position that predicts the first scored token, the first
    span's start - 1; vLLM's own output has a row per position (0). The output's length is checked against it, so
    a row is never read from another position.
    """
    if len(flat) != n_tokens - first_row:
        raise RuntimeError(f"vLLM returned prompt logprobs for {len(flat)} positions, expected "
                           f"{n_tokens - first_row} ({n_tokens} tokens, rows from position {first_row}): the engine "
                           "does not score the way this stage asked; is the response-scoring plugin applied "
                           "(pipeline/response_scoring.py)?")  # fmt: skip
    parts = [_rows(flat, start - first_row, length, k) for start, length in spans if length]
    return _stack(parts, k)


def generated_logprobs(flat, n: int, k: int) -> tuple[np.ndarray, ...]:
    """From vLLM flat sample logprobs of a generation: (token_logprobs (n,), topk_ids (n,k), topk_logprobs (n,k))
    of its n generated tokens; entry j holds [generated token j, then the top-k] (the same layout as prompt
    logprobs, checked)."""
    if len(flat) != n:
        raise RuntimeError(f"vLLM returned logprobs for {len(flat)} generated tokens, expected {n}")
    return _stack([_rows(flat, 0, n, k)], k)


def _rows(flat, first: int, n: int, k: int) -> tuple[np.ndarray, ...]:
    s, e = flat.start_indices[first], flat.end_indices[first + n - 1]
    if e - s != n * (k + 1):
        raise RuntimeError(f"vLLM returned {e - s} logprobs for {n} positions, expected {k + 1} each (the token, "
                           f"then its top-{k})")  # fmt: skip
    ids = np.asarray(flat.token_ids[s:e], dtype=np.int64).reshape(n, k + 1)
    lps = np.asarray(flat.logprobs[s:e], dtype=np.float32).reshape(n, k + 1)
    return lps[:, 0], ids[:, 1:], lps[:, 1:]


def _stack(parts: list[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, ...]:
    if not parts:
        return np.zeros(0, np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def generation_params(cfg: TeacherConfig, per_position: int, room: int):
    """The SamplingParams a response is written with: the teacher's settings, at most `room` tokens (what the
    context leaves); with one-pass responses the top-k of every generated token (raw logits: temperature 1)."""
    from vllm import SamplingParams

    one_pass = cfg.responses_mode == "teacher"
    return SamplingParams(max_tokens=min(cfg.max_new_tokens, room), min_tokens=min(cfg.min_new_tokens, room),
                          temperature=cfg.temperature,
                          seed=cfg.seed if cfg.temperature > 0 else None, detokenize=False, flat_logprobs=True,
                          logprobs=per_position if one_pass else None)  # fmt: skip


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
            cfg.model, tokenizer, cfg.top_k if cfg.targets == "topk" else None, cfg.responses_mode, turns=cfg.turns,
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
    if cfg.responses != cfg.responses_mode:
        print(f"--responses {cfg.responses} with --targets {cfg.targets}: the draws are taken in the scoring pass, so "
              f"the teacher writes its responses, then they are scored again ({cfg.responses_mode})", file=sys.stderr)
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


@dataclass
class Job:
    """One sample's work: its conversation's tokens (`enc`; with an open end the teacher writes the last turn) and,
    once written, the generation's output."""

    sample: dict
    enc: EncodedConversation
    written: object = None  # vLLM's CompletionOutput of the written response


def _score_and_store(todo: list[dict], llm, cfg: TeacherConfig, setup: "CacheSetup", writer: CacheWriter,
                     rejected: list, stats: Counter, phases: Counter, bar) -> None:  # fmt: skip
    """Score the samples group by group; a group's encode + write runs on one thread, in order, while the next
    group is scored. Leaving the executor waits for it, so the writer's lock is never released under a write.

    --responses dataset: one scoring pass (prompt logprobs over the scored turns). teacher: one generation pass
    whose top-k per generated token are cached as they come (earlier turns, with --turns all, scored by the same
    request's prompt logprobs). teacher-rescored: a generation pass, then a scoring pass over the written ids."""
    from vllm.inputs import TokensPrompt

    max_model_len = llm.llm_engine.model_config.max_model_len
    max_len = max_model_len - 1  # vLLM must have room to generate one token after the scored ones
    mode = cfg.responses_mode
    in_flight = None
    with ThreadPoolExecutor(1, thread_name_prefix="cache-write") as storing, bar:
        for start in range(0, len(todo), cfg.group_size):
            group = todo[start : start + cfg.group_size]
            jobs = [Job(s, enc) for s in group
                    if (enc := _encode_or_reject(s, setup.tokenizer, cfg, max_len, max_model_len, rejected, stats))]  # fmt: skip
            t = time.monotonic()
            if mode != "dataset" and jobs:
                params = [_request_params(cfg, setup, job, max_model_len) for job in jobs]
                outs = llm.generate([TokensPrompt(prompt_token_ids=job.enc.input_ids) for job in jobs], params,
                                    use_tqdm=False)  # fmt: skip
                stats["prefix_cached"] += check_prefix_hits(outs, jobs, cfg.scoring == "response", params)
                for job, o in zip(jobs, outs):
                    out = o.outputs[0]
                    job.enc, job.written = job.enc.with_written(list(out.token_ids)), out
                    stats["generated"] += len(out.token_ids)
                    stats["responses_cut"] += out.finish_reason == "length"
            if mode != "teacher" and jobs:
                params = [_request_params(cfg, setup, job, max_model_len) for job in jobs]
                outs = llm.generate([TokensPrompt(prompt_token_ids=job.enc.input_ids) for job in jobs], params,
                                    use_tqdm=False)  # fmt: skip
                stats["prefix_cached"] += check_prefix_hits(outs, jobs, cfg.scoring == "response", params)
            phases["scoring"] += time.monotonic() - t
            if in_flight is not None:
                in_flight.result()  # at most one group being stored; its error surfaces here
            if jobs:
                in_flight = storing.submit(_store_group, writer, jobs, outs, setup, stats, phases, mode,
                                           cfg.scoring == "response")  # fmt: skip
            bar.update(len(group))
            bar.set_postfix(tokens=stats["tokens"], rejects=len(rejected))
        if in_flight is not None:
            in_flight.result()


def _request_params(cfg: TeacherConfig, setup: "CacheSetup", job: Job, max_model_len: int):
    """A job's SamplingParams for its next pass: writing its response (an open end), else scoring its turns (prompt
    logprobs from its first scored position: pipeline.response_scoring's extra_args)."""
    from vllm import SamplingParams

    enc, per_position = job.enc, setup.encoding.per_position
    if enc.open_end:
        # room: the rescoring pass needs one token after the written ones, as every scoring request does
        params = generation_params(cfg, per_position, max_model_len - 1 - len(enc.input_ids))
        earlier = any(length for _, length in enc.spans)  # --turns all: turns the prompt itself holds
        if not (earlier and cfg.responses_mode == "teacher"):
            return params
        params.prompt_logprobs = per_position  # one pass: the earlier turns scored by the same request
    else:
        params = SamplingParams(max_tokens=1, prompt_logprobs=per_position, detokenize=False, flat_logprobs=True)
    # vLLM reads no prefix cache for a request with prompt logprobs unless told to; response scoring caps the hits
    # at the first scored position (pipeline/response_scoring.py), so it may
    params.skip_reading_prefix_cache = not (cfg.scoring == "response" and cfg.prefix_cache)
    if cfg.scoring == "response" or setup.encoding.draws:
        params.extra_args = request_args(cfg, setup.encoding, enc.spans[0][0], job.sample["content_sha256"])
    return params


def first_scored_row(enc: EncodedConversation, response_scoring: bool) -> int:
    """The first position this stage has vLLM return prompt logprobs for: with response scoring the one that
    predicts the first scored token (request_args asks for it; vLLM's output starts there), else 0. Worked out
    from the sample, not read back from the plugin, so the engine's output is checked against what was asked."""
    return enc.spans[0][0] - 1 if response_scoring else 0


def check_prefix_hits(outs: list, jobs: list[Job], response_scoring: bool, params: list) -> int:
    """The prompt tokens vLLM took from its prefix cache for these outputs; raises if a hit of a request with
    prompt logprobs covered a scored position (its row would be empty): past the position before the first
    scored token with response scoring, any hit without it."""
    total = 0
    for o, job, p in zip(outs, jobs, params):
        hit = o.num_cached_tokens or 0
        total += hit
        if p.prompt_logprobs is None:  # a generation alone: any hit is fine
            continue
        allowed = first_scored_row(job.enc, response_scoring)
        if hit > allowed:
            raise RuntimeError(f"vLLM reused {hit} cached tokens of sample {job.sample['sample_id']!r}, past its first "
                               f"scored position {allowed}: its rows would not be scored. The prefix-cache cap of "
                               f"pipeline/response_scoring.py is not in effect in the engine; rerun with "
                               f"--no-prefix-cache")  # fmt: skip
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


def _store_group(writer: CacheWriter, jobs: list[Job], outs: list, setup: "CacheSetup", stats: Counter,
                 phases: Counter, mode: str, response_scoring: bool) -> None:  # fmt: skip
    """A scored group's rows, encoded and appended (the writer flushes a shard when it is full)."""
    k = setup.encoding.per_position
    for job, o in zip(jobs, outs):
        t = time.monotonic()
        enc, s = job.enc, job.sample
        spans = enc.spans
        if mode == "teacher":  # the written turn from the generation's logprobs, earlier turns from its prompt's
            *before, (_, n_written) = spans
            prompt = [span for span in before if span[1]]
            parts = []
            if prompt:
                parts.append(span_logprobs(o.prompt_logprobs, spans[-1][0], prompt, k,
                                           first_scored_row(enc, response_scoring)))  # fmt: skip
            parts.append(generated_logprobs(job.written.logprobs, n_written, k))
            token_lp, topk_ids, topk_lp = _stack(parts, k)
        else:
            token_lp, topk_ids, topk_lp = span_logprobs(o.prompt_logprobs, len(enc.input_ids), spans, k,
                                                        first_scored_row(enc, response_scoring))  # fmt: skip
        response = (setup.tokenizer.decode(job.written.token_ids, skip_special_tokens=True).strip()
                    if job.written is not None else s["response"])  # fmt: skip
        row = encode(ScoredSample(s["sample_id"], response, np.asarray(enc.response_ids), token_lp, topk_ids,
                                  topk_lp, s["content_sha256"], [a for a, _ in spans], [n for _, n in spans]),
                     setup.encoding)  # fmt: skip
        t2 = time.monotonic()
        writer.add(row)
        phases["encode"] += t2 - t
        phases["write"] += time.monotonic() - t2
        stats["cached"] += 1
        stats["tokens"] += len(enc.response_ids)
        stats["tokens_scored"] += len(enc.input_ids)


def _encode_or_reject(s: dict, tokenizer, cfg: TeacherConfig, max_len: int, max_model_len: int, rejected: list,
                      stats: Counter) -> EncodedConversation | None:  # fmt: skip
    """The sample's conversation as token ids to score (or to write the last turn of), or None after recording why
    it is a reject."""
    sid = s["sample_id"]
    chat = bool(s.get("messages"))
    special = special_token_problem(tokenizer, s)
    if special:
        rejected.append(reject("cache", special[0], special[1], sample_id=sid))
        return None
    turns = to_score(conversation(s), cfg.responses_mode)
    if turns[-1]["role"] != "assistant" and not cfg.writes_responses:
        why = ("ends with a user turn: there is no answer to score; give one, or pass --responses teacher" if chat
               else "empty: the cache scores a response; give one, or pass --responses teacher")  # fmt: skip
        rejected.append(reject("cache", "messages" if chat else "response", why, sample_id=sid))
        return None
    try:
        enc = encode_conversation(tokenizer, turns, cfg.turns)
    except TemplateMismatch as exc:
        rejected.append(reject("cache", "messages" if chat else "prompt", str(exc), sample_id=sid))
        return None
    total = len(enc.input_ids) + (1 if enc.open_end else 0)  # a written turn needs room for one token at least
    if total <= max_len:
        return enc
    if cfg.too_long == "truncate" and not enc.open_end and (cut := enc.truncated(max_len)) is not None:
        stats["truncated"] += 1
        return cut
    n_prompt = len(enc.prompt_ids)
    field_ = ("messages" if chat else "prompt") if n_prompt >= max_len or enc.open_end else (
        "messages" if chat else "response")  # fmt: skip
    written = " (and the 1 token the teacher writes at least)" if enc.open_end else ""
    rejected.append(reject("cache", field_, (
        f"too long: {n_prompt} prompt + {len(enc.response_ids)} scored tokens{written} > {max_len} (max_model_len "
        f"{max_model_len} less the 1 token vLLM generates; raise --max-model-len or pass --too-long truncate)"),
        sample_id=sid))  # fmt: skip
    return None


@cli("pipeline.teacher")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TeacherConfig, argv, description=__doc__)
    print(format_summary(cache_teacher_logits(cfg.validate())))


if __name__ == "__main__":
    sys.exit(main())
