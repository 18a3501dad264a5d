"""The student side under faults: verified checkpoints (and --resume previous), verified feature shards, a full disk
in one line (checkpoints and the cache), exact records after a resume, and a rerun refused while a partition's old
writer still runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import REPO, one_line_error, run, tiny_teacher_config

TRAIN = str(REPO / "student" / "train.py")


def _argv(cache, out, *extra) -> list[str]:
    return ["--logits", str(cache), "--out", str(out), "--steps", "6", "--align-steps", "2", "--batch-size", "4",
            "--warmup", "1", "--eval-every", "0", "--save-every", "2", "--keep-checkpoints", "3", "--num-workers", "0",
            "--encoder-dropout", "0", "--seed", "3", "--device", "cpu", "--no-final-eval", *extra]  # fmt: skip


def _train(argv: list[str]) -> None:
    from student.train import parse_args, train

    train(parse_args(argv), progress=False)


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "metrics.csv")))


@pytest.fixture(scope="module")
def reference(student_cache, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    _train(_argv(student_cache, out))
    return out


def test_a_corrupt_checkpoint_is_refused_in_one_line_and_the_previous_one_resumes_on_request(reference,
                                                                                             student_cache, tmp_path):  # fmt: skip
    from student.checkpoint import LATEST, complete_checkpoints

    assert complete_checkpoints(reference) == ["step-00000002", "step-00000004", "step-00000006"]
    for damage in ("flip", "half", "empty"):
        victim = tmp_path / damage
        shutil.copytree(reference, victim)
        model_pt = victim / "checkpoints" / "step-00000006" / "model.pt"
        data = bytearray(model_pt.read_bytes())
        if damage == "flip":
            mid = len(data) // 2
            data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
        else:
            data = data[: len(data) // 2] if damage == "half" else bytearray()
        model_pt.write_bytes(bytes(data))
        r = run([TRAIN, *_argv(student_cache, victim, "--resume", "--steps", "8")])
        one_line_error(r, 5, str(model_pt), "--resume previous")
    # on request, the checkpoint before it: steps 5 and 6 again, each once, equal to the uninterrupted run's
    victim = tmp_path / "flip"
    assert (victim / "checkpoints" / LATEST).read_text().strip() == "step-00000006"
    _train(_argv(student_cache, victim, "--resume", "previous"))
    got, want = _rows(victim), _rows(reference)
    assert [r["step"] for r in got] == [str(i) for i in range(1, 7)]
    for a, b in zip(got, want):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6, abs=1e-7)


def test_a_resumed_run_keeps_every_step_of_its_records_once(reference, student_cache, tmp_path):
    """A kill after step 6's metrics row but before its checkpoint (the state such a kill leaves: the newest
    checkpoint is step 4's, metrics.csv has 6 rows): --resume cuts the records back to step 4 and redoes 5 and 6."""
    from student.checkpoint import LATEST

    victim = tmp_path / "killed"
    shutil.copytree(reference, victim)
    shutil.rmtree(victim / "checkpoints" / "step-00000006")
    (victim / "checkpoints" / LATEST).write_text("step-00000004\n")
    _train(_argv(student_cache, victim, "--resume"))
    got, want = _rows(victim), _rows(reference)
    assert [r["step"] for r in got] == [str(i) for i in range(1, 7)]
    for a, b in zip(got, want):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_feature_shard_is_refused_by_the_student_in_one_line(student_cache, tmp_path, damage):
    features = tmp_path / "features"
    shutil.copytree(student_cache.parent / "features", features)
    shard = sorted(features.glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    r = run([TRAIN, *_argv(student_cache, tmp_path / "run", "--features", str(features))])
    one_line_error(r, 5, str(shard), "pipeline.features --audio-index")


# --- a full disk ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path):
    """A tmpfs mounted here (root only), and a way to make it bigger: the test's full disk."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (the full disk) needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_a_checkpoint_on_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(reference, student_cache,
                                                                                       tiny_fs):  # fmt: skip
    mount, resize = tiny_fs
    model_pt = reference / "checkpoints" / "step-00000002" / "model.pt"
    optim_pt = model_pt.with_name("optim.pt")
    one = model_pt.stat().st_size + optim_pt.stat().st_size
    resize(f"{int(one * 1.6) // 1024}k")  # room for the first checkpoint and the records, not for the second
    out = mount / "run"
    r = run([TRAIN, *_argv(student_cache, out)])
    line = one_line_error(r, 6, "cannot write", str(out / "checkpoints"), "no space left", "run the same command")
    assert "Traceback" not in r.stderr and not _temp_files(mount)  # no partial checkpoint is left
    assert r.stderr.strip().splitlines()[-1] == line  # the error is the last line: no progress bar redrawn after it
    from student.checkpoint import LATEST, complete_checkpoints

    assert complete_checkpoints(out) == ["step-00000002"] and (out / "checkpoints" / LATEST).exists()
    resize("100m")  # room again: the same command, resumed, ends as the uninterrupted run
    _train(_argv(student_cache, out, "--resume"))
    got, want = _rows(out), _rows(reference)
    assert [r["step"] for r in got] == [str(i) for i in range(1, 7)]
    for a, b in zip(got, want):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6, abs=1e-7)


def test_a_cache_write_on_a_full_disk_is_one_line_and_a_rerun_completes_exactly_once(samples_dir, tiny_teacher,
                                                                                     vllm_engine, tiny_fs, tmp_path):  # fmt: skip
    from pipeline.cache import CacheReader
    from pipeline.errors import CannotWrite
    from pipeline.teacher import cache_teacher_logits

    mount, resize = tiny_fs
    cfg = tiny_teacher_config(tiny_teacher, samples=samples_dir, out=mount / "cache", top_k=8, rows_per_shard=8,
                              limit=64)  # fmt: skip
    clean = tiny_teacher_config(tiny_teacher, samples=samples_dir, out=tmp_path / "clean", top_k=8, rows_per_shard=8,
                                limit=64)  # fmt: skip
    cache_teacher_logits(clean, progress=False, llm=vllm_engine)
    resize("40k")
    with pytest.raises(CannotWrite, match=rf"cannot write {mount / 'cache'}.*no space left.*run the same command"):
        cache_teacher_logits(cfg, progress=False, llm=vllm_engine)
    assert not _temp_files(mount)
    committed = CacheReader(mount / "cache")  # what was committed before the disk filled reads, verified
    assert 0 < committed.num_rows < 64
    resize("100m")
    cache_teacher_logits(cfg, progress=False, llm=vllm_engine)
    got, want = CacheReader(mount / "cache"), CacheReader(clean.out)
    ids = got.sample_ids()
    assert len(ids) == len(set(ids)) == 64 and set(ids) == set(want.sample_ids())
    a, b = got.get(ids), want.get(ids)
    for sid in ids:
        assert a[sid]["token_ids"].tolist() == b[sid]["token_ids"].tolist()
        assert (a[sid]["topk_logprobs"] == b[sid]["topk_logprobs"]).all()


def test_a_rerun_is_refused_while_an_old_worker_still_writes_its_partition(samples_dir, tiny_teacher, vllm_engine,
                                                                          tmp_path):  # fmt: skip
    """The flow's driver died; its Ray workers finish their partitions on their own, each holding its partition's
    lock. A rerun started meanwhile is refused by that lock in one line, naming the process that holds it."""
    from pipeline.cache import partition_dir
    from pipeline.teacher import cache_teacher_logits

    cfg = tiny_teacher_config(tiny_teacher, samples=samples_dir, out=tmp_path / "cache", top_k=8, limit=16,
                              partitions=2)  # fmt: skip
    cache_teacher_logits(cfg, progress=False, llm=vllm_engine)
    held = partition_dir(cfg.out_dir, 0, 2)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from pipeline.cache import Locks\nwith Locks([Path(sys.argv[1])], 'x'):\n"
                               "    print('holding', flush=True); time.sleep(120)", str(held)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        r = run(["-m", "pipeline.teacher", "--samples", str(samples_dir), "--out", str(cfg.out), "--teacher",
                 str(tiny_teacher), "--dtype", "float32", "--max-model-len", "128", "--kv-cache-gib", "0.25",
                 "--top-k", "8", "--limit", "16", "--partition", "0"])  # fmt: skip
        one_line_error(r, 2, f"another process (pid {holder.pid} on", str(held), "wait for it or stop it")
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert (held / "manifest.json").exists() and json.loads((held / "manifest.json").read_text())["shards"]
    assert all(pq.read_metadata(p).num_rows for p in held.glob("part-*.parquet"))  # the partition is intact
