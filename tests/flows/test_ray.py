"""Caching on Ray workers through Prefect: a real local Ray cluster, two workers each with its own vLLM engine,
one of them killed (SIGKILL) mid-partition; the cache must be the one a single worker makes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cache import MANIFEST, CacheEncoding, CacheReader, partition_of, read_manifest
from pipeline.query import connect
from pipeline.samples import load_samples
from pipeline.schemas import read_metadata
from pipeline.teacher import cache_teacher_logits
from tests.helpers import tiny_teacher_config

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _writer_pid(partition: Path) -> int | None:
    """The pid the partition's lock names, while that process lives (the lock file outlives its writer)."""
    try:
        text = (partition / ".lock").read_text().split()
    except OSError:
        return None
    pid = int(text[1]) if len(text) >= 2 and text[0] == "pid" else None
    return pid if pid and _alive(pid) else None


def _rows_in(partition: Path) -> int:
    try:
        manifest = read_manifest(partition)
    except (OSError, json.JSONDecodeError):
        return 0
    return sum(e["rows"] for e in (manifest or {}).get("shards", {}).values())


def test_two_ray_workers_one_killed_mid_run_give_the_one_worker_cache(tiny_teacher, tiny_rows, vllm_engine, tiny_vits,
                                                                      tmp_path):  # fmt: skip
    src = tmp_path / "src.jsonl"
    rows = tiny_rows[:120]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "data"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_LOGGING_LEVEL": "WARNING",
           "RAY_AUTH_MODE": "disabled", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    cmd = [sys.executable, "flows/cache_teacher.py", "--data-dir", str(data), "--source", str(src), "--teacher",
           str(tiny_teacher), "--top-k", "8", "--tts", "vits", "--tts-model", str(tiny_vits), "--rates", "170",
           "--heldout-voice", "", "--heldout-tts", "",
           "--max-model-len", "128", "--kv-cache-gib", "0.25", "--dtype", "float32", "--rows-per-shard", "2",
           "--group-size", "1"]  # fmt: skip
    log = tmp_path / "flow.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([*cmd, "--workers", "2", "--partitions", "2"], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)  # fmt: skip
        part0 = data / "cache" / "partition-0000"
        killed, rows_at_kill = None, 0
        deadline = time.monotonic() + 1500  # a bound for a hung run only: a loaded machine took > 400 s to start
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            pid = _writer_pid(part0)
            if pid is not None and pid != proc.pid and _rows_in(part0) >= 2:
                rows_at_kill = _rows_in(part0)
                os.kill(pid, signal.SIGKILL)  # the Ray worker scoring partition 0, mid-partition
                killed = pid
            time.sleep(0.02)
        rc = proc.wait(timeout=1500)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    assert killed is not None, "partition 0 finished before its worker could be killed: " + out[-2000:]

    samples = load_samples(data / "samples").to_pylist()
    ids = [s["sample_id"] for s in samples]
    # the speech of this run: the VITS backend (--tts vits) in its default voices, every sample spoken
    audio = pq.read_table(data / "audio" / "index.parquet")
    assert read_metadata(audio.schema)["tts_backend"] == f"vits:{tiny_vits}"
    assert set(audio["voice"].to_pylist()) <= {"spk0", "spk1", "spk2"} and len(set(audio["voice"].to_pylist())) > 1
    assert sorted(audio["sample_id"].to_pylist()) == sorted(ids)
    share0 = sum(partition_of(sid, 2) == 0 for sid in ids)
    assert 0 < rows_at_kill < share0  # killed with part of its partition written

    reader = CacheReader(data / "cache", verify=True)
    assert reader.partitions == 2 and json.loads((data / "cache" / MANIFEST).read_text())["layout"] == "partitioned"
    cached = reader.sample_ids()
    assert len(cached) == len(set(cached)) == len(ids) and set(cached) == set(ids)  # exactly once, no gaps
    for p in range(2):  # each sample in its own partition
        part_ids = CacheReader(data / "cache" / f"partition-{p:04d}").sample_ids()
        assert {partition_of(sid, 2) for sid in part_ids} == {p}

    # the same samples cached by one worker, in this process, into today's one-partition layout
    ref_dir = tmp_path / "one-worker"
    cache_teacher_logits(tiny_teacher_config(tiny_teacher, samples=data / "samples", out=ref_dir, top_k=8), False,
                         vllm_engine)  # fmt: skip
    ref = CacheReader(ref_dir)
    assert ref.partitions == 1 and ref.fingerprint == {k: v for k, v in reader.fingerprint.items()}
    a, b = reader.get(ids), ref.get(ids)
    for sid in ids:
        assert a[sid]["response"] == b[sid]["response"]
        assert a[sid]["token_ids"].tolist() == b[sid]["token_ids"].tolist()
        assert a[sid]["topk_ids"].tolist() == b[sid]["topk_ids"].tolist()
        np.testing.assert_allclose(a[sid]["topk_logprobs"], b[sid]["topk_logprobs"],
                                   atol=CacheEncoding(8, 2).max_error * 2)  # fmt: skip

    # the DuckDB views see the union of the partitions, row for row what the one-worker cache has
    con, con_ref = connect(data), connect(data, ref_dir)
    for sql in ("SELECT count(*), count(DISTINCT sample_id) FROM cache", "SELECT count(*) FROM teacher_tokens",
                "SELECT count(*) FROM teacher_samples", "SELECT count(*) FROM responses"):  # fmt: skip
        assert con.sql(sql).fetchall() == con_ref.sql(sql).fetchall(), sql
    assert con.sql("SELECT count(*) FROM cache").fetchall()[0][0] == len(ids)

    # the student's data path reads the partitioned cache as it reads a one-partition one: same examples, same targets
    from transformers import AutoTokenizer

    from student.data import StudentData

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    parted, single = StudentData.open(data / "cache", tok), StudentData.open(ref_dir, tok, features_dir=data / "features")
    assert len(parted) == len(single) > 0
    examples = {(e.sample_id, e.rendition): e for e in (parted.example(i) for i in range(len(parted)))}
    for i in range(len(single)):
        e = single.example(i)
        p = examples[(e.sample_id, e.rendition)]
        assert p.response_ids.tolist() == e.response_ids.tolist() and p.topk_ids.tolist() == e.topk_ids.tolist()
        assert len(p.clips) == len(e.clips) == 1
        np.testing.assert_array_equal(p.clips[0], e.clips[0])

    # a rerun (one worker now, no Ray) finds everything cached: nothing scored twice
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"0 samples cached now (0 of them re-scored: their content changed since cached), {len(ids)} already" \
        in again.stdout
    assert sorted(CacheReader(data / "cache").sample_ids()) == sorted(ids)
