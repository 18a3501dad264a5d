"""The teacher logit cache: encoding, fidelity against transformers, exactly-once, rejects, DuckDB."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cache import (CacheEncoding, CacheReader, FingerprintMismatch, ScoredSample, decode_sampled, decode_topk,
                            encode)
from pipeline.chat import encode_pair
from pipeline.parquet_io import rejects_path
from pipeline.query import connect
from pipeline.samples import ingest
from pipeline.teacher import cache_teacher_logits, span_logprobs
from tests.helpers import tiny_teacher_config

REPO = Path(__file__).resolve().parents[2]


def _cfg(samples_dir, out, tiny_teacher, **kw):
    return tiny_teacher_config(tiny_teacher, samples=samples_dir, out=out, **kw)


def _rows(cache_dir) -> dict[str, dict]:
    reader = CacheReader(cache_dir, verify=True)
    return {r["sample_id"]: reader.decode_row(r) for r in reader.iter_rows()}


# --- encoding --------------------------------------------------------------------


@pytest.mark.parametrize("vocab,k", [(1000, 8), (32000, 64), (151_936, 20)])
def test_encode_decode_roundtrip_within_declared_error(vocab, k):
    rng = np.random.default_rng(0)
    n = 17
    logits = rng.normal(0, 3, (n, vocab))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-logp, axis=1)[:, :k]
    top_lp = np.take_along_axis(logp, order, 1).astype(np.float32)
    enc = CacheEncoding(k, vocab, 1 / 32)
    s = ScoredSample("s", "r", order[:, 0], top_lp[:, 0], order, top_lp)
    row = encode(s, enc)
    ids, lps = decode_topk(row["topk_ids"], row["topk_codes"], row["top1_logprobs"], n, enc)
    assert (ids == order).all()
    assert np.abs(lps - top_lp).max() <= enc.max_error + 1e-6
    np.testing.assert_allclose(lps[:, 0], top_lp[:, 0])  # top-1 stored exactly
    tail = 1 - np.exp(top_lp.astype(np.float64)).sum(1)
    np.testing.assert_allclose(np.exp(row["tail_logmass"].astype(np.float64)), tail, rtol=2e-3, atol=1e-6)
    assert enc.id_bits == int(vocab - 1).bit_length()


# --- teacher scoring --------------------------------------------------------------


@pytest.mark.slow
def test_cached_topk_equals_a_transformers_forward(samples_dir, tiny_teacher, vllm_engine, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "cache"
    summary = cache_teacher_logits(_cfg(samples_dir, out, tiny_teacher, top_k=16, limit=24), False, vllm_engine)
    assert summary["cached_now"] == 24 and summary["rejected"] == 0
    rows = _rows(out)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    samples = {r["sample_id"]: r for r in pq.read_table(samples_dir / "samples.parquet").to_pylist()}
    reader = CacheReader(out)
    enc = reader.encoding
    # the row-group path the student streams through decodes to the same rows
    seen = 0
    for shard, group, sids, _hashes in reader.row_groups():
        table = reader.read_row_group(shard, group)
        for i, sid in enumerate(sids):
            got = reader.decode_table_row(table, i)
            assert got["token_ids"].tolist() == rows[sid]["token_ids"].tolist()
            np.testing.assert_array_equal(got["topk_ids"], rows[sid]["topk_ids"])
            np.testing.assert_array_equal(got["topk_logprobs"], rows[sid]["topk_logprobs"])
            seen += 1
    assert seen == len(rows)
    for sid, row in rows.items():
        s = samples[sid]
        pair = encode_pair(tok, s["prompt"], s["response"])
        assert row["token_ids"].tolist() == pair.response_ids
        assert row["token_ids"][-1] == tok.eos_token_id  # the end-of-turn token is scored too
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([pair.input_ids])).logits[0].double(), -1)
        p0 = len(pair.prompt_ids)
        ref = logp[p0 - 1 : p0 - 1 + len(pair.response_ids)]  # the distribution that predicts each response token
        top = ref.topk(16, dim=-1)
        np.testing.assert_allclose(row["topk_logprobs"], top.values.numpy(), atol=enc.max_error + 1e-4)
        # ids equal except where two logprobs are tied within float noise
        same = row["topk_ids"] == top.indices.numpy()
        gaps = np.abs(np.diff(top.values.numpy(), axis=1))
        near_tie = np.zeros_like(same)
        near_tie[:, :-1] |= gaps < 1e-4
        near_tie[:, 1:] |= gaps < 1e-4
        assert (same | near_tie).all()
        want_tok = ref.gather(1, torch.tensor(pair.response_ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(row["token_logprobs"], want_tok, atol=1e-4)
        tail = np.log1p(-np.exp(top.values.numpy()).sum(1))
        np.testing.assert_allclose(row["tail_logmass"], tail, atol=0.05)


@pytest.mark.slow
def test_rerun_skips_and_fingerprint_mismatch_is_refused(samples_dir, tiny_teacher, vllm_engine, tmp_path):
    out = tmp_path / "cache"
    cache_teacher_logits(_cfg(samples_dir, out, tiny_teacher, top_k=8, limit=10), False, vllm_engine)
    again = cache_teacher_logits(_cfg(samples_dir, out, tiny_teacher, top_k=8, limit=20), False, vllm_engine)
    assert again["already_cached"] == 10 and again["cached_now"] == 10
    assert CacheReader(out).num_rows == 20
    with pytest.raises(FingerprintMismatch, match="top_k: cache has 8, this run has 16"):
        cache_teacher_logits(_cfg(samples_dir, out, tiny_teacher, top_k=16, limit=20), False, vllm_engine)
    assert CacheReader(out).num_rows == 20  # refused without touching it
    redo = cache_teacher_logits(_cfg(samples_dir, out, tiny_teacher, top_k=16, limit=5, overwrite=True), False,
                                vllm_engine)  # fmt: skip
    assert redo["cached_now"] == 5 and CacheReader(out).encoding.top_k == 16 and CacheReader(out).num_rows == 5


@pytest.mark.slow
def test_over_long_and_empty_samples_are_rejects(tiny_teacher, vllm_engine, tmp_path):
    src = tmp_path / "src.jsonl"
    rows = [
        {"sample_id": "ok", "prompt": "What is 1 plus 2?", "response": "1 plus 2 is 3."},
        {"sample_id": "empty", "prompt": "What is 2 plus 2?", "response": ""},
        {"sample_id": "long-prompt", "prompt": "What is the capital " * 60, "response": "Nobody knows."},
        {"sample_id": "long-response", "prompt": "Say it.", "response": "The capital of Foo is Bar. " * 40},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(str(src), tmp_path / "samples", progress=False)
    out = tmp_path / "cache"
    summary = cache_teacher_logits(_cfg(tmp_path / "samples", out, tiny_teacher, top_k=4), False, vllm_engine)
    assert summary["cached_now"] == 1 and summary["rejected"] == 3
    rejects = {r["sample_id"]: r for r in pq.read_table(rejects_path(out, "cache")).to_pylist()}
    assert set(rejects) == {"empty", "long-prompt", "long-response"}
    assert rejects["empty"]["field"] == "response" and "--responses teacher" in rejects["empty"]["reason"]
    assert rejects["long-prompt"]["field"] == "prompt" and "max_model_len 128" in rejects["long-prompt"]["reason"]
    assert rejects["long-response"]["field"] == "response" and "too long" in rejects["long-response"]["reason"]
    # a group in which every sample is rejected is recorded, not sent to vLLM empty
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("".join(json.dumps({**r, "response": ""}) + "\n" for r in rows))
    ingest(str(only_bad), tmp_path / "bad_samples", progress=False)
    s_bad = cache_teacher_logits(_cfg(tmp_path / "bad_samples", tmp_path / "bad_cache", tiny_teacher, top_k=4),
                                 False, vllm_engine)  # fmt: skip
    assert s_bad["cached_now"] == 0 and s_bad["rejected"] == 4
    # the explicit truncation policy keeps the long response, cut to fit
    out2 = tmp_path / "cache2"
    s2 = cache_teacher_logits(_cfg(tmp_path / "samples", out2, tiny_teacher, top_k=4, too_long="truncate"), False,
                              vllm_engine)  # fmt: skip
    assert s2["cached_now"] == 2 and s2["truncated"] == 1
    assert _rows(out2)["long-response"]["token_ids"].size == 127 - len(
        encode_pair(__import__("transformers").AutoTokenizer.from_pretrained(tiny_teacher), "Say it.", "x").prompt_ids
    )


@pytest.mark.slow
def test_teacher_written_responses_are_cached_and_the_samples_stay_as_they_were(samples_dir, tiny_teacher,
                                                                                vllm_engine, tmp_path):  # fmt: skip
    import shutil

    from pipeline.query import connect

    data = tmp_path / "data"
    local = data / "samples"
    shutil.copytree(samples_dir, local)
    before = (local / "samples.parquet").read_bytes()
    out = data / "cache"
    s = cache_teacher_logits(_cfg(local, out, tiny_teacher, top_k=4, limit=6, responses="teacher",
                                  max_new_tokens=12), False, vllm_engine)  # fmt: skip
    assert s["cached_now"] + s["rejected"] == 6 and s["cached_now"] > 0
    assert (local / "samples.parquet").read_bytes() == before  # samples are immutable
    rows = _rows(out)
    dataset = {r["sample_id"]: r["response"] for r in pq.read_table(local / "samples.parquet").to_pylist()}
    view = {r[0]: r[1:] for r in connect(data).sql(
        "SELECT sample_id, response, response_source, dataset_response FROM responses").fetchall()}  # fmt: skip
    assert view.keys() == rows.keys()
    for sid, row in rows.items():
        assert view[sid] == (row["response"], "teacher", dataset[sid])


# --- exactly once under SIGKILL -----------------------------------------------------------


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_gives_exactly_one_row_per_sample(samples_dir, tiny_teacher, vllm_engine,
                                                                     tmp_path):  # fmt: skip
    n = pq.read_metadata(samples_dir / "samples.parquet").num_rows
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.teacher", "--samples", str(samples_dir), "--out", str(out),
           "--model", str(tiny_teacher), "--dtype", "float32", "--max-model-len", "128", "--kv-cache-gib", "0.25",
           "--top-k", "8", "--group-size", "4", "--rows-per-shard", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        manifest = out / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; give it more samples"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = CacheReader(out).num_rows
    assert 0 < partial < n

    resumed = cache_teacher_logits(_cfg(samples_dir, out, tiny_teacher, top_k=8), False, vllm_engine)
    assert resumed["already_cached"] >= partial
    ids = CacheReader(out, verify=True).sample_ids()
    assert len(ids) == len(set(ids)) == n  # exactly one row per sample, no gaps

    clean = tmp_path / "clean"
    cache_teacher_logits(_cfg(samples_dir, clean, tiny_teacher, top_k=8), False, vllm_engine)
    a, b = _rows(out), _rows(clean)
    assert a.keys() == b.keys()
    for sid in a:
        assert a[sid]["token_ids"].tolist() == b[sid]["token_ids"].tolist()
        assert a[sid]["topk_ids"].tolist() == b[sid]["topk_ids"].tolist()
        np.testing.assert_allclose(a[sid]["topk_logprobs"], b[sid]["topk_logprobs"], atol=CacheEncoding(8, 2).max_error * 2)


# --- DuckDB -------------------------------------------------------------------------


@pytest.mark.slow
def test_duckdb_views_over_a_produced_cache(samples_dir, tiny_teacher, vllm_engine, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(samples_dir, data / "samples")
    summary = cache_teacher_logits(_cfg(data / "samples", data / "cache", tiny_teacher, top_k=8, limit=12), False,
                                   vllm_engine)  # fmt: skip
    con = connect(data)
    assert con.sql("SELECT count(*) FROM cache").fetchall()[0][0] == 12
    n_tokens = con.sql("SELECT count(*) FROM teacher_tokens").fetchall()[0][0]
    assert n_tokens == summary["tokens_cached"]
    per_sample = con.sql("SELECT count(*), sum(n_tokens) FROM teacher_samples").fetchall()[0]
    assert per_sample == (12, n_tokens)
    rows = _rows(data / "cache")
    sid, pos, token_id, top1_id, entropy = con.sql(
        "SELECT sample_id, position, token_id, top1_id, entropy FROM teacher_tokens ORDER BY sample_id, position LIMIT 1"
    ).fetchall()[0]
    assert token_id == rows[sid]["token_ids"][pos] and top1_id == rows[sid]["topk_ids"][pos, 0]
    p = np.exp(rows[sid]["topk_logprobs"][pos].astype(np.float64))
    p /= p.sum()
    assert abs(entropy - float(-(p * np.log(p)).sum())) < 0.02
    joined = con.sql("SELECT count(*) FROM teacher_samples JOIN samples USING (sample_id)").fetchall()[0][0]
    assert joined == 12


# --- response-only scoring (pipeline/response_scoring.py) ---------------------------------------------------------


@pytest.mark.slow
def test_response_only_scoring_skips_prompt_positions_and_caches_the_same_rows(samples_dir, tiny_teacher,
                                                                              vllm_engine, tmp_path):  # fmt: skip
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline import response_scoring
    from pipeline.chat import encode_pair

    response_scoring.require()
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    rows = pq.read_table(samples_dir / "samples.parquet").to_pylist()[:12]
    pairs = [encode_pair(tok, r["prompt"], r["response"]) for r in rows]
    full = SamplingParams(max_tokens=1, prompt_logprobs=8, detokenize=False, flat_logprobs=True)
    starts = []
    for pair in pairs:
        p = full.clone()
        p.extra_args = {response_scoring.EXTRA_ARG: len(pair.prompt_ids)}
        starts.append(p)
    prompts = [TokensPrompt(prompt_token_ids=p.input_ids) for p in pairs]
    outs_full = vllm_engine.generate(prompts, full, use_tqdm=False)
    outs_resp = vllm_engine.generate(prompts, starts, use_tqdm=False)
    for pair, a, b in zip(pairs, outs_full, outs_resp):
        fa, fb = a.prompt_logprobs, b.prompt_logprobs
        first = len(pair.prompt_ids) - 1  # the position that predicts the first response token
        # vLLM's None, then a row per scored position (first .. the last but one): none for the prompt's positions
        assert len(fa) == len(pair.input_ids) and len(fb) == len(pair.input_ids) - first
        kept_a = slice(fa.start_indices[first + 1], fa.end_indices[-1])
        kept_b = slice(fb.start_indices[1], fb.end_indices[-1])
        assert fa.token_ids[kept_a] == fb.token_ids[kept_b]
        np.testing.assert_allclose(fa.logprobs[kept_a], fb.logprobs[kept_b], atol=1e-5)
        n = len(pair.response_ids)
        total, spans = len(pair.input_ids), [(first + 1, n)]
        for got, want in zip(span_logprobs(fb, total, spans, 8, first), span_logprobs(fa, total, spans, 8)):
            np.testing.assert_allclose(got, want, atol=1e-5)
        with pytest.raises(RuntimeError, match="prompt logprobs for"):  # vLLM's full output read as response rows
            span_logprobs(fa, total, spans, 8, first)

    # the cache stage: --scoring response (the default) and --scoring full give the same rows
    a = cache_teacher_logits(_cfg(samples_dir, tmp_path / "response", tiny_teacher, top_k=8, limit=30), False,
                             vllm_engine)  # fmt: skip
    b = cache_teacher_logits(_cfg(samples_dir, tmp_path / "full", tiny_teacher, top_k=8, limit=30, scoring="full"),
                             False, vllm_engine)  # fmt: skip
    assert a["cached_now"] == b["cached_now"] == 30
    ra, rb = _rows(tmp_path / "response"), _rows(tmp_path / "full")
    assert ra.keys() == rb.keys()
    for sid in ra:
        assert ra[sid]["topk_ids"].tolist() == rb[sid]["topk_ids"].tolist()
        np.testing.assert_allclose(ra[sid]["topk_logprobs"], rb[sid]["topk_logprobs"], atol=CacheEncoding(8, 2).max_error)
        np.testing.assert_allclose(ra[sid]["token_logprobs"], rb[sid]["token_logprobs"], atol=1e-5)

    # a memory budget of one row per LM-head batch (each request's rows scored apart, row by row): the same rows
    c = cache_teacher_logits(_cfg(samples_dir, tmp_path / "one-row", tiny_teacher, top_k=8, limit=30,
                                  logprobs_memory_gib=1e-9), False, vllm_engine)  # fmt: skip
    assert c["cached_now"] == 30
    rc = _rows(tmp_path / "one-row")
    for sid in ra:
        assert ra[sid]["topk_ids"].tolist() == rc[sid]["topk_ids"].tolist()
        np.testing.assert_allclose(ra[sid]["topk_logprobs"], rc[sid]["topk_logprobs"], atol=CacheEncoding(8, 2).max_error)


def test_lm_head_batches_follow_the_memory_budget_and_the_engine_step_is_left_to_vllm():
    from pipeline.response_scoring import BATCH_LOGIT_BYTES, batch_rows
    from pipeline.engine import engine_step_tokens

    gib = 1 << 30
    assert batch_rows(151936, gib, sampled=False, on_cpu=False) == gib // (151936 * 6) == 1177
    assert batch_rows(151936, gib, sampled=True, on_cpu=False) == 294
    assert batch_rows(151936, None, sampled=False, on_cpu=False) is None  # a GPU step without a budget: one batch
    assert batch_rows(32000, gib, sampled=False, on_cpu=True) == BATCH_LOGIT_BYTES // (4 * 32000) == 131
    assert batch_rows(32000, None, sampled=False, on_cpu=True) == 131
    assert batch_rows(151936, 10, sampled=True, on_cpu=True) == 1  # never 0
    cfg = tiny_teacher_config(Path("teacher"))
    assert engine_step_tokens(cfg, 151936, 4096) is None  # --scoring response: vLLM's default for the device
    assert engine_step_tokens(replace(cfg, scoring="full"), 151936, 4096) == 1177  # capped by the memory budget
    assert engine_step_tokens(replace(cfg, scoring="full", targets="sampled"), 151936, 4096) == 294
    assert engine_step_tokens(replace(cfg, max_batched_tokens=2048), 151936, 4096) == 2048


@pytest.mark.slow
def test_prefix_cache_hits_stop_before_the_response_and_change_no_row(tiny_rows, tiny_teacher, vllm_engine,
                                                                      tmp_path):  # fmt: skip
    """Samples that share a long context (two 32-token KV blocks and more) and, in pairs, the same prompt and
    response: with response scoring vLLM reuses the shared prompt blocks, never a block holding a scored position,
    and the rows equal those of --scoring full (no cache reads at all)."""
    import json

    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.chat import conversation, encode_conversation, encode_pair
    from pipeline.teacher import Job, check_prefix_hits

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    context, i = "Context:", 0
    while len(encode_pair(tok, context, "").prompt_ids) < 72:  # past two 32-token blocks
        context += f" {tiny_rows[i]['prompt']} {tiny_rows[i]['response']}."
        i += 1
    lines = []
    for j, r in enumerate(tiny_rows[10:30]):
        prompt = f"{context} Question: {r['prompt']}"
        assert len(encode_pair(tok, prompt, r["response"]).input_ids) < 127, "context too long for the test engine"
        lines.append({"sample_id": f"q{j}", "prompt": prompt, "response": r["response"], "split": "train"})
        if j % 2 == 0:  # the same prompt and response again: a hit could reach into the response
            lines.append({**lines[-1], "sample_id": f"q{j}-again"})
    src = tmp_path / "shared.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ingest(str(src), tmp_path / "samples", progress=False)

    full = cache_teacher_logits(_cfg(tmp_path / "samples", tmp_path / "full", tiny_teacher, top_k=8, scoring="full"),
                                False, vllm_engine)  # fmt: skip
    resp = cache_teacher_logits(_cfg(tmp_path / "samples", tmp_path / "resp", tiny_teacher, top_k=8), False,
                                vllm_engine)  # fmt: skip
    assert full["cached_now"] == resp["cached_now"] == len(lines)
    assert full["prompt_tokens_from_prefix_cache"] == 0  # vLLM's own rule for prompt logprobs: no reads
    assert resp["prompt_tokens_from_prefix_cache"] >= 64 * (len(lines) - 1)  # the shared blocks, reused
    ra, rb = _rows(tmp_path / "full"), _rows(tmp_path / "resp")
    assert ra.keys() == rb.keys()
    for sid in ra:
        assert ra[sid]["topk_ids"].tolist() == rb[sid]["topk_ids"].tolist(), sid
        np.testing.assert_allclose(ra[sid]["topk_logprobs"], rb[sid]["topk_logprobs"], atol=CacheEncoding(8, 2).max_error)
        np.testing.assert_allclose(ra[sid]["token_logprobs"], rb[sid]["token_logprobs"], atol=1e-5)

    # the engine itself: a repeated sample reuses whole blocks, up to its first scored position and not past it
    pair = encode_pair(tok, lines[0]["prompt"], lines[0]["response"])
    params = SamplingParams(max_tokens=1, prompt_logprobs=8, detokenize=False, flat_logprobs=True,
                            skip_reading_prefix_cache=False,
                            extra_args={"speechkd_logprob_start": len(pair.prompt_ids)})  # fmt: skip
    out = vllm_engine.generate([TokensPrompt(prompt_token_ids=pair.input_ids)], params, use_tqdm=False)[0]
    first = len(pair.prompt_ids) - 1
    assert 64 <= out.num_cached_tokens <= first and out.num_cached_tokens % 32 == 0, (out.num_cached_tokens, first)
    job = Job(lines[0], encode_conversation(tok, conversation(lines[0])))
    assert check_prefix_hits([out], [job], True, [params]) == out.num_cached_tokens
    # a hit reported past the first scored position (an engine without the cap) stops the run, naming the sample
    out.num_cached_tokens = first + 1
    with pytest.raises(RuntimeError, match="q0.*past its first scored position"):
        check_prefix_hits([out], [job], True, [params])


def test_scored_rows_are_batched_in_order_without_splitting_a_request():
    from pipeline.response_scoring import row_batches

    chunks = [(f"r{i}", n) for i, n in enumerate([3, 5, 2, 9, 1, 1, 4])]
    batches = row_batches(chunks, max_rows=6)
    assert [c for b in batches for c in b] == chunks  # every chunk once, in order
    assert [[c[0] for c in b] for b in batches] == [["r0"], ["r1"], ["r2"], ["r3"], ["r4", "r5", "r6"]]
    assert all(sum(c[1] for c in b) <= 6 or len(b) == 1 for b in batches)  # a longer request alone
    assert row_batches(chunks, max_rows=100) == [chunks]


def test_response_scoring_refuses_a_vllm_whose_prompt_logprob_code_changed(monkeypatch):
    from vllm.v1.worker import gpu_model_runner

    from pipeline import response_scoring
    from pipeline.errors import UserError

    def changed(self, hidden_states, num_scheduled_tokens):  # a later vLLM's version of the function
        return {}

    monkeypatch.setattr(gpu_model_runner.GPUModelRunner, "_get_prompt_logprobs_dict", changed)
    monkeypatch.setattr(response_scoring, "_state", {"applied": False, "problem": None})
    with pytest.raises(UserError, match="not the one speechkd's response-only scoring was written for.*--scoring full"):
        response_scoring.require()
    assert gpu_model_runner.GPUModelRunner._get_prompt_logprobs_dict is changed  # left as it was, not patched


# --- sampled targets (RS-KD) ------------------------------------------------------


def test_sampled_encoding_roundtrip_keeps_every_draw():
    rng = np.random.default_rng(1)
    n, N, vocab = 23, 12, 32000
    p = rng.dirichlet(np.full(40, 0.3), size=n)  # peaked distributions over 40 of the ids
    support = rng.choice(vocab, 40, replace=False)
    draws = np.stack([rng.choice(support, N, p=p[t]) for t in range(n)])
    enc = CacheEncoding(None, vocab, draws=N, draw_temperature=1.0, draw_seed=0)
    row = encode(ScoredSample("s", "r", draws[:, 0], np.zeros(n), draws, np.zeros((n, N))), enc)
    ids, counts = decode_sampled(row["draw_ids"], row["draw_counts"], n, enc)
    for t in range(n):
        want_ids, want_counts = np.unique(draws[t], return_counts=True)
        got = counts[t] > 0
        assert ids[t][got].tolist() == want_ids.tolist() and counts[t][got].tolist() == want_counts.tolist()
        assert (counts[t][~got] == 0).all() and counts[t].sum() == N
    assert len(row["draw_counts"]) == sum(len(np.unique(d)) for d in draws)


def _rank_histogram(ids, counts, logp, edges=(1, 2, 5, 20)):
    """Draw counts by the drawn id's rank under the teacher (buckets [0,1), [1,2), [2,5), [5,20), [20,V))."""
    rank = torch.argsort(torch.argsort(-logp, dim=-1), dim=-1)  # rank of every id at each position
    r = torch.gather(rank, 1, torch.as_tensor(ids)).numpy()
    bucket = np.searchsorted(np.array(edges), r, side="right")
    return np.bincount(bucket[counts > 0], weights=counts[counts > 0], minlength=len(edges) + 1)


def _expected_histogram(logp, tau, N, edges=(1, 2, 5, 20)):
    """Expected draw counts per rank bucket (and their binomial standard deviations) when drawing N ids per position
    from softmax(logp / tau)."""
    p = torch.softmax(logp / tau, -1)
    sorted_p = p.gather(1, torch.argsort(-logp, dim=-1))
    bounds = [0, *edges, p.shape[1]]
    mass = torch.stack([sorted_p[:, a:b].sum(1) for a, b in zip(bounds[:-1], bounds[1:])], 1).numpy()
    return (N * mass).sum(0), np.sqrt((N * mass * (1 - mass)).sum(0))


@pytest.mark.slow
def test_sampled_targets_are_draws_from_the_teachers_tempered_distribution(samples_dir, tiny_teacher, vllm_engine,
                                                                          tmp_path):  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    N, tau = 64, 2.0
    cfg = _cfg(samples_dir, tmp_path / "sampled", tiny_teacher, targets="sampled", draws=N, draw_temperature=tau,
               limit=40)  # fmt: skip
    summary = cache_teacher_logits(cfg, False, vllm_engine)
    assert summary["cached_now"] == 40 and summary["targets"] == f"sampled {N} @ T=2"
    reader = CacheReader(tmp_path / "sampled")
    assert reader.targets == "sampled" and reader.fingerprint["draws"] == N
    rows = _rows(tmp_path / "sampled")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    samples = {r["sample_id"]: r for r in pq.read_table(samples_dir / "samples.parquet").to_pylist()}
    observed, expected, var, expected_t1 = 0, 0, 0, 0
    for sid, row in rows.items():
        pair = encode_pair(tok, samples[sid]["prompt"], samples[sid]["response"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([pair.input_ids])).logits[0].double(), -1)
        p0 = len(pair.prompt_ids)
        ref = logp[p0 - 1 : p0 - 1 + len(pair.response_ids)]
        ids, counts = row["draw_ids"], row["draw_counts"]
        assert (counts.sum(1) == N).all()
        # distinct, ascending ids at each position
        assert all(np.all(np.diff(ids[t][counts[t] > 0]) > 0) for t in range(len(ids)))
        # the actual token's logprob: exact, as in a top-k cache
        want = ref.gather(1, torch.tensor(pair.response_ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(row["token_logprobs"], want, atol=1e-4)
        observed = observed + _rank_histogram(ids, counts, ref)
        e, sd = _expected_histogram(ref, tau, N)
        expected, var = expected + e, var + sd**2
        expected_t1 = expected_t1 + _expected_histogram(ref, 1.0, N)[0]
    sd = np.sqrt(var)
    print("draws by teacher rank bucket: observed", observed, "expected", expected.round(1), "sd", sd.round(1),
          "at T=1", expected_t1.round(1))  # fmt: skip
    # the draws follow softmax(logits / 2) rank bucket by rank bucket, within 5 standard deviations ...
    assert np.all(np.abs(observed - expected) <= 5 * sd + 1), (observed, expected, sd)
    # ... which the untempered distribution would fail by far (the check can tell the temperature)
    assert np.max(np.abs(expected_t1 - expected) / (sd + 1)) > 20

    # the same sample gets the same draws whatever the path (every prompt position scored, other batches)
    full = _cfg(samples_dir, tmp_path / "full", tiny_teacher, targets="sampled", draws=N, draw_temperature=tau,
                limit=40, scoring="full", group_size=7)  # fmt: skip
    cache_teacher_logits(full, False, vllm_engine)
    again = _rows(tmp_path / "full")
    same = [np.array_equal(rows[s]["draw_ids"], again[s]["draw_ids"])
            and np.array_equal(rows[s]["draw_counts"], again[s]["draw_counts"]) for s in rows]  # fmt: skip
    assert np.mean(same) >= 0.95, np.mean(same)

    # another seed draws other ids: appending it to this cache is refused, the difference named
    with pytest.raises(FingerprintMismatch, match="draw_seed"):
        cache_teacher_logits(_cfg(samples_dir, tmp_path / "sampled", tiny_teacher, targets="sampled", draws=N,
                                  draw_temperature=tau, limit=41, seed=1), False, vllm_engine)  # fmt: skip

    # DuckDB: the sampled views
    con = connect(samples_dir.parent, tmp_path / "sampled")
    n_tok, per_token = con.sql("SELECT sum(n_tokens), avg(distinct_draws_per_token) FROM teacher_samples").fetchall()[0]
    assert n_tok == sum(len(r["token_ids"]) for r in rows.values()) and 1 < per_token < N
    assert con.sql("SELECT count(*) FROM teacher_tokens").fetchall()[0][0] == n_tok


RETRY_IN_ONE_PROCESS = """
import sys
from pathlib import Path
from pipeline.engine import LazyEngine
from pipeline.teacher import cache_teacher_logits
from tests.helpers import tiny_teacher_config

teacher, samples, out = map(Path, sys.argv[1:4])
cfg = tiny_teacher_config(teacher, samples=samples, out=out, top_k=8, limit=12)
engine = LazyEngine(cfg)
try:
    with engine:
        llm = engine.get()
        raise RuntimeError("a failure after the engine started")
except RuntimeError:
    pass
# shut down although this frame still holds the engine (as a failed task's traceback does)
assert engine.llm is None and not llm.llm_engine.engine_core._finalizer.alive, "engine not shut down"
summary = cache_teacher_logits(cfg, progress=False)  # the retry: a new engine in the same process
assert summary["cached_now"] == 12 and summary["rejected"] == 0, summary
print("retry ok")
"""


@pytest.mark.slow
def test_an_engine_is_shut_down_when_its_run_fails_and_a_retry_starts_another_in_the_same_process(
        samples_dir, tiny_teacher, tmp_path):  # fmt: skip
    # a Prefect retry runs in the same (Ray worker) process; on a GPU, an engine left running by the failed try
    # would hold the memory the retry's engine needs. Its own process: vLLM's teardown resets process-wide state
    # that the session's shared engine uses.
    r = subprocess.run([sys.executable, "-c", RETRY_IN_ONE_PROCESS, str(tiny_teacher), str(samples_dir),
                        str(tmp_path / "cache")], cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0 and "retry ok" in r.stdout, r.stderr[-3000:]
    assert CacheReader(tmp_path / "cache").num_rows == 12
