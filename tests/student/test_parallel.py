"""Students that do not fit one GPU: FSDP2 over 2 gloo ranks steps like one process (both kinds, with gradient
accumulation), resumes exactly from its sharded checkpoint, refuses a checkpoint whose save was cut short and
resumes from the one before on request; activation checkpointing changes no loss."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from tests.helpers import torchrun


def _args(cache, out, *extra) -> list[str]:
    return ["--logits", str(cache), "--out", str(out), "--steps", "4", "--batch-size", "8", "--warmup", "1",
            "--eval-every", "0", "--save-every", "2", "--encoder-dropout", "0", "--num-workers", "0", "--seed", "3",
            "--device", "cpu", "--no-final-eval", *extra]  # fmt: skip


def _train_here(argv: list[str]) -> None:
    """The same command line in this process (one process, no torchrun): the reference run."""
    from student.train import parse_args, train

    train(parse_args(argv), progress=False)


def _final_state(run) -> dict:
    from student.interface import load_student

    return load_student(run / "final").state_dict()


def _same(a: dict, b: dict, atol: float = 1e-4) -> int:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)
    return len(a)


def _losses(run) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(run / "metrics.csv"))]


@pytest.fixture(scope="module")
def composed_runs(student_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    _train_here(_args(student_cache, root / "one", "--align-steps", "2"))
    r = torchrun(_args(student_cache, root / "fsdp", "--align-steps", "2", "--parallel", "fsdp"), nproc=2)
    return root, r


def test_two_fsdp_ranks_step_like_one_process(composed_runs):
    root, r = composed_runs
    assert "FSDP2: 2 rank(s)" in r.stdout and "2 rank(s), global batch 8 = 2 x 1 x 4" in r.stdout
    assert _same(_final_state(root / "one"), _final_state(root / "fsdp")) > 10  # final/: gathered by rank 0
    assert _losses(root / "one") == pytest.approx(_losses(root / "fsdp"), rel=1e-4)
    shards = sorted(p.name for p in (root / "fsdp" / "checkpoints" / "step-00000004").iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards and "MANIFEST.json" in shards


def test_an_fsdp_run_resumes_exactly_and_a_cut_short_save_is_refused_then_skipped_on_request(composed_runs,
                                                                                              student_cache):  # fmt: skip
    root, _ = composed_runs
    run = root / "sliced"
    fsdp = ["--align-steps", "2", "--parallel", "fsdp"]
    torchrun(_args(student_cache, run, *fsdp, "--stop-after", "2"), nproc=2)
    torchrun(_args(student_cache, run, *fsdp, "--resume"), nproc=2)
    assert _losses(run) == pytest.approx(_losses(root / "fsdp"), rel=1e-6, abs=1e-7)
    _same(_final_state(root / "fsdp"), _final_state(run), atol=1e-6)
    # a save killed midway: the newest checkpoint's shard truncated (as a kill during its write would leave it)
    newest = run / "checkpoints" / "step-00000004"
    shard = newest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    r = torchrun(_args(student_cache, run, *fsdp, "--resume", "--steps", "6"), nproc=2, check=False)
    # each rank: one line naming the shard and what to do, exit 5 (torchrun then reports the ranks' exit code)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert len(lines) == 2 and all(str(shard) in ln and "truncated" in ln and "--resume previous" in ln
                                   for ln in lines), r.stderr[-3000:]  # fmt: skip
    assert r.returncode != 0 and "exitcode  : 5" in r.stderr
    # on request, the one before it: steps 3..6 again, from step 2
    torchrun(_args(student_cache, run, *fsdp, "--resume", "previous", "--steps", "6"), nproc=2)
    steps = [int(x["step"]) for x in csv.DictReader(open(run / "metrics.csv"))]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step once: the rows after the checkpoint were cut back
    assert _losses(run)[:4] == pytest.approx(_losses(root / "fsdp"), rel=1e-6, abs=1e-7)


def test_an_hf_student_under_fsdp_with_grad_accumulation_steps_like_one_process(student_cache, tiny_teacher,
                                                                                 tmp_path):  # fmt: skip
    from toy.speech_llm import SpeechLLMBuild, build

    student = build(SpeechLLMBuild(teacher=str(tiny_teacher), out=str(tmp_path / "qwen2-audio"), hidden_size=32))
    hf = ["--student", str(student), "--lr", "1e-2", "--backbone-lr", "1e-2"]
    _train_here(_args(student_cache, tmp_path / "one", *hf))
    torchrun(_args(student_cache, tmp_path / "fsdp", *hf, "--parallel", "fsdp", "--grad-accum", "2"), nproc=2)
    assert _same(_final_state(tmp_path / "one"), _final_state(tmp_path / "fsdp")) > 10
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "fsdp"), rel=1e-4)


def test_activation_checkpointing_changes_no_loss(student_cache, tmp_path):
    from student.train import parse_args, train

    common = _args(student_cache, tmp_path / "plain", "--align-steps", "2", "--encoder-dropout", "0.1")
    train(parse_args(common), progress=False, final_eval=False)
    ac = [*_args(student_cache, tmp_path / "ac", "--align-steps", "2", "--encoder-dropout", "0.1"),
          "--activation-checkpointing"]  # fmt: skip
    train(parse_args(ac), progress=False, final_eval=False)
    assert _losses(tmp_path / "plain") == pytest.approx(_losses(tmp_path / "ac"), rel=1e-5)  # dropout replayed too
    shutil.rmtree(tmp_path / "ac")


@pytest.mark.slow  # starts its own vLLM engine (the padded-vocabulary teacher) and torchrun
def test_the_gpu_benchs_path_runs_on_cpu_at_a_toy_shape(samples_dir, tiny_teacher, tmp_path):
    """bench/student_gpu.py, prepared and run as on the GPU machine but at a toy shape: the teacher padded to a
    152k vocabulary, its one-pass written responses cached, a Qwen2-Audio student with LoRA under FSDP with
    activation checkpointing trained from them, and the report's figures read back."""
    import json

    from tests.helpers import run

    data = samples_dir.parent  # the fixtures' data root: samples/ and models/teacher, as make demo's data/
    work = tmp_path / "gpu_bench"
    prep = run(["-m", "bench.student_gpu", "--prepare", "--data", str(data), "--work", str(work), "--samples", "6",
                "--response-tokens", "24"])  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert not list((work / "teacher").glob("*.safetensors"))  # the weights are not carried, the tokenizer is
    size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    assert size < 16 * 2**20
    r = run(["-m", "bench.student_gpu", "--work", str(work), "--hidden", "32", "--layers", "2", "--intermediate",
             "64", "--heads", "2", "--kv-heads", "1", "--device", "cpu", "--steps", "2", "--batch-size", "2",
             "--student-dir", str(tmp_path / "student")])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("{")))
    # the student's vocabulary, which its LM head and the KD softmax span: the teacher's 152064 + 3 audio tokens
    assert row["vocab"] == 152064 + 3 and row["trained"] < row["parameters"] and len(row["step_s_all"]) == 2
    assert row["tokens_per_step"] > 2 * 2 * 24  # two examples, both channels, responses of >= 24 tokens
