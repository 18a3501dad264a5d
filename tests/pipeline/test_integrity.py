"""Cache integrity: nothing corrupt, stale or mislabelled reaches the student; bad input is one line + an exit
code (issue 9, one test per numbered case; ingest cases (6) are in test_samples.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cache import CacheReader, FingerprintMismatch
from pipeline.errors import CorruptData
from pipeline.teacher import cache_teacher_logits
from pipeline.teacher_config import TeacherConfig
from tests.helpers import tiny_teacher_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cfg(samples, out, teacher, **kw) -> TeacherConfig:
    return tiny_teacher_config(teacher, samples=samples, out=out, **{"top_k": 8, "rows_per_shard": 8, **kw})


@pytest.fixture
def small_cache(samples_dir, tiny_teacher, vllm_engine, tmp_path):
    """24 samples in 3 shards, with their own copy of the samples."""
    local = tmp_path / "samples"
    shutil.copytree(samples_dir, local)
    out = tmp_path / "cache"
    cache_teacher_logits(_cfg(local, out, tiny_teacher, limit=24), False, vllm_engine)
    return local, out


def _run(args: list[str], cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, last)


# (1) a corrupt shard is refused by every reader, by default ------------------------------------------------


def test_flipped_bytes_in_a_shard_are_refused_by_the_reader_and_the_student(small_cache, tmp_path):
    samples, out = small_cache
    shard = sorted(out.glob("part-*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptData, match=shard.name):
        CacheReader(out)
    r = _run([str(REPO / "student" / "train.py"), "--logits", str(out), "--out", str(tmp_path / "run"), "--steps",
              "2", "--align-steps", "1", "--batch-size", "2", "--samples", str(samples)])  # fmt: skip
    _one_line_error(r, 5, shard.name, "sha256", "pipeline.teacher")


# (2) a truncated / unreadable shard: one error naming it, in the reader and in the teacher's resume -----------


def test_truncated_shard_is_named_by_the_reader_and_the_teachers_resume(small_cache, tiny_teacher, vllm_engine):
    samples, out = small_cache
    shard = sorted(out.glob("part-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CorruptData, match=shard.name):
        CacheReader(out)
    with pytest.raises(CorruptData, match="not a readable Parquet file"):
        CacheReader(out, verify=False)  # without the checksum, the footer is still checked
    with pytest.raises(CorruptData, match=shard.name):
        cache_teacher_logits(_cfg(samples, out, tiny_teacher, limit=24), False, vllm_engine)
    # the message's fix works: move it away, re-run; its samples are scored again, exactly once
    shard.rename(shard.with_suffix(".corrupt"))
    again = cache_teacher_logits(_cfg(samples, out, tiny_teacher, limit=24), False, vllm_engine)
    assert again["cached_now"] == 8
    ids = CacheReader(out).sample_ids()
    assert len(ids) == len(set(ids)) == 24


# (3) a lost manifest never adopts shards of another setup ----------------------------------------------------


def test_lost_manifest_adopts_only_shards_of_the_same_setup(small_cache, tiny_teacher, vllm_engine):
    samples, out = small_cache
    (out / "manifest.json").unlink()
    with pytest.raises(FingerprintMismatch, match="top_k"):
        cache_teacher_logits(_cfg(samples, out, tiny_teacher, top_k=4, limit=24), False, vllm_engine)
    assert not (out / "manifest.json").exists() or CacheReader(out).encoding.top_k == 8
    (out / "manifest.json").unlink(missing_ok=True)
    same = cache_teacher_logits(_cfg(samples, out, tiny_teacher, limit=24), False, vllm_engine)
    assert same["cached_now"] == 0 and same["already_cached"] == 24  # adopted: same fingerprint
    # and every reader checks each shard's own fingerprint against the manifest
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"]["top_k"] = 4
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FingerprintMismatch, match="top_k"):
        CacheReader(out)


# (4) edited samples are re-scored exactly once; the student skips stale rows until then -----------------------


def test_edited_samples_are_rescored_and_the_student_skips_stale_rows(small_cache, tiny_teacher, vllm_engine):
    from transformers import AutoTokenizer

    from pipeline.samples import SAMPLES_FILE
    from student.data import StudentData

    samples, out = small_cache
    table = pq.read_table(samples / SAMPLES_FILE)
    rows = table.to_pylist()
    cached = set(CacheReader(out).sample_ids())
    edited = [r["sample_id"] for r in rows if r["sample_id"] in cached][:3]
    for r in rows:
        if r["sample_id"] in edited:
            r["response"] = r["response"] + " Indeed."
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), samples / SAMPLES_FILE)

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    for split in ("train", "eval"):
        data = StudentData.open(out, tok, samples, need_speech=False, split=split)
        stale = set(data.report.stale)
        assert stale == {sid for sid in edited if data.samples.split_of[sid] == split}
        assert not stale & {data.sample_id(i) for i in range(len(data))}
        if stale:
            assert "stale" in data.report.summary()

    again = cache_teacher_logits(_cfg(samples, out, tiny_teacher, limit=24), False, vllm_engine)
    assert again["rescored_changed"] == 3 and again["cached_now"] == 3
    reader = CacheReader(out)
    ids = reader.sample_ids()
    assert len(ids) == len(set(ids)) == 24
    responses = {r["sample_id"]: r["response"] for r in reader.iter_rows(["sample_id", "response"])}
    assert all(responses[sid].endswith(" Indeed.") for sid in edited)
    assert cache_teacher_logits(_cfg(samples, out, tiny_teacher, limit=24), False, vllm_engine)["cached_now"] == 0


def test_a_rewrite_killed_between_journal_and_rename_is_rolled_back_then_redone(small_cache, tiny_teacher,
                                                                                vllm_engine, monkeypatch):  # fmt: skip
    from pipeline.cache import CacheEncoding, CacheWriter

    samples, out = small_cache
    reader = CacheReader(out)
    victim = reader.sample_ids()[:2]
    enc = CacheEncoding.from_dict(reader.fingerprint)

    real_replace = os.replace

    def killed(src, dst, *a, **k):  # the manifest (journal) lands; the shard rename does not
        if str(dst).endswith(".parquet"):
            raise KeyboardInterrupt("killed between journal and rename")
        return real_replace(src, dst, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            with CacheWriter(out, reader.fingerprint, enc, inputs={}) as w:
                w.remove(set(victim))
    assert json.loads((out / "manifest.json").read_text()).get("pending")  # the journal is on disk
    with CacheWriter(out, reader.fingerprint, enc, inputs={}) as w:  # rolled back: the old shard stands
        assert set(victim) <= set(w.done) and len(w.done) == 24
        assert w.remove(set(victim)) == 2 and len(w.done) == 22
    after = CacheReader(out)  # verifies every checksum
    assert after.num_rows == 22 and not set(victim) & set(after.sample_ids())


# (5) --dtype auto is the checkpoint's dtype; another dtype cannot append -------------------------------------


def test_dtype_auto_is_the_checkpoint_dtype_and_another_dtype_is_refused(small_cache, tiny_teacher, vllm_engine,
                                                                         tmp_path):  # fmt: skip
    from transformers import AutoConfig

    from pipeline.engine import resolve_dtype

    assert resolve_dtype("auto", str(tiny_teacher)) == "float32"  # what the toy teacher was saved in
    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_teacher, bf16)
    cfg = AutoConfig.from_pretrained(bf16)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(bf16)
    assert resolve_dtype("auto", str(bf16)) == "bfloat16"
    samples, out = small_cache
    assert CacheReader(out).fingerprint["dtype"] == "float32"
    other = _cfg(samples, out, tiny_teacher, limit=24, dtype="bfloat16")
    with pytest.raises(FingerprintMismatch, match="dtype: cache has 'float32', this run has 'bfloat16'"):
        cache_teacher_logits(other, False, vllm_engine)


# (7) user errors are one line and an exit code, in every CLI --------------------------------------------------


def test_user_errors_are_one_line_with_distinct_exit_codes(small_cache, tiny_teacher, tmp_path):
    samples, out = small_cache
    teacher = ["-m", "pipeline.teacher", "--samples", str(samples), "--out", str(out), "--model", str(tiny_teacher),
               "--max-model-len", "128", "--kv-cache-gib", "0.25", "--limit", "24"]  # fmt: skip
    _one_line_error(_run([*teacher, "--top-k", "4"]), 4, "different teacher setup", "top_k")
    _one_line_error(_run(["-m", "pipeline.query", "--data", str(tmp_path / "none"), "SELECT 1 FROM cache"]), 3)
    _one_line_error(_run([str(REPO / "student" / "evaluate.py"), "--student", str(tmp_path / "nothing")]), 3,
                    "no student")  # fmt: skip
    # a student backbone with another tokenizer
    from toy.teacher import train_tokenizer

    other = tmp_path / "other-model"
    shutil.copytree(tiny_teacher, other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    train_tokenizer(["a completely different corpus", "with other merges"], 300).save_pretrained(other)
    r = _run([str(REPO / "student" / "train.py"), "--logits", str(out), "--backbone", str(other), "--out",
              str(tmp_path / "run"), "--samples", str(samples), "--steps", "2", "--align-steps", "1"])  # fmt: skip
    _one_line_error(r, 4, "different tokenizer")


# (8) special-token text inside the data is rejected, with the reason ------------------------------------------


def test_special_token_text_in_a_sample_is_a_reject(tiny_teacher, vllm_engine, tmp_path):
    from pipeline.parquet_io import rejects_path
    from pipeline.samples import ingest

    src = tmp_path / "src.jsonl"
    rows = [
        {"sample_id": "ok", "prompt": "What is 1 plus 2?", "response": "1 plus 2 is 3."},
        {"sample_id": "end-in-response", "prompt": "What is 2 plus 2?", "response": "4<|end|> and more"},
        {"sample_id": "turn-in-prompt", "prompt": "Hi <|user|> what is 3 plus 3?", "response": "6."},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(str(src), tmp_path / "samples", progress=False)
    out = tmp_path / "cache"
    summary = cache_teacher_logits(_cfg(tmp_path / "samples", out, tiny_teacher), False, vllm_engine)
    assert summary["cached_now"] == 1 and summary["rejected"] == 2
    rejects = {r["sample_id"]: r for r in pq.read_table(rejects_path(out, "cache")).to_pylist()}
    assert rejects["end-in-response"]["field"] == "response" and "'<|end|>'" in rejects["end-in-response"]["reason"]
    assert rejects["turn-in-prompt"]["field"] == "prompt" and "'<|user|>'" in rejects["turn-in-prompt"]["reason"]


# (9) the weight-hash memo sees an in-place rewrite that restores the mtime -----------------------------------


def test_weight_hash_memo_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path, monkeypatch):
    from pipeline.fingerprint import weights_sha256

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = tmp_path / "m"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"A" * 4096)
    first = weights_sha256(model)
    st = weights.stat()
    with open(weights, "r+b") as fh:  # in place: same inode, same size
        fh.write(b"B")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored, as rsync -t / cp -p would
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_size == st.st_size
    assert weights_sha256(model) != first
