"""The student: KD losses against dense references, the data join, resume, and the no-teacher rule."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from student import losses

REPO = Path(__file__).resolve().parents[2]


# --- losses -------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_losses_equal_dense_reference_when_k_is_the_vocabulary(tau):
    torch.manual_seed(0)
    B, T, V = 3, 5, 50
    student = torch.randn(B, T, V) * 2
    teacher = torch.randn(B, T, V) * 2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    t_lp = torch.log_softmax(teacher, -1)
    top = t_lp.topk(V, dim=-1)  # k = V: every id, in rank order
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1.0))
    args = dict(teacher_ids=top.indices, teacher_logprobs=top.values, mask=mask, tau=tau, tail_logmass=tail)
    dense_f = losses.dense_forward_kl(student, teacher, mask, tau)
    dense_r = losses.dense_reverse_kl(student, teacher, mask, tau)
    torch.testing.assert_close(losses.forward_kl_topk(student, **args), dense_f, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(losses.forward_kl_tail(student, **args), dense_f, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(losses.reverse_kl_topk(student, **args), dense_r, atol=1e-5, rtol=1e-4)
    assert dense_f > 0.1  # a real difference, not two zeros


def test_sparse_kd_is_zero_at_the_teacher_and_the_tail_variant_sees_outside_mass():
    torch.manual_seed(1)
    V, k = 40, 6
    logits = torch.randn(2, 4, V) * 3
    lp = torch.log_softmax(logits, -1)
    top = lp.topk(k, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    mask = torch.ones(2, 4, dtype=torch.bool)
    args = dict(teacher_ids=top.indices, teacher_logprobs=top.values, mask=mask, tail_logmass=tail)
    assert losses.forward_kl_topk(logits, **args) < 1e-6
    assert losses.forward_kl_tail(logits, **args) < 1e-5
    assert losses.reverse_kl_topk(logits, **args) < 1e-6
    # a student with the same shape inside the top-k but a different tail mass:
    shifted = logits.clone()
    shifted.scatter_(-1, top.indices, torch.gather(logits, -1, top.indices) + 2.0)
    assert losses.forward_kl_topk(shifted, **args) < 1e-5  # renormalized top-k cannot see it
    assert losses.forward_kl_tail(shifted, **args) > 1e-2  # the tail bucket does


def test_response_ce_masks_padding():
    logits = torch.randn(2, 3, 10)
    target = torch.randint(0, 10, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    ce = losses.response_ce(logits, target, mask)
    ref = torch.nn.functional.cross_entropy(logits[mask], target[mask])
    torch.testing.assert_close(ce, ref)


# --- data -------------------------------------------------------------------------


def test_join_aligns_response_positions_with_cached_tokens(student_cache, tiny_teacher):
    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader
    from student.data import collate, gather_positions, load_examples, speech_inputs
    from student.model import SpeechLLM, StudentConfig

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    examples, report = load_examples(student_cache, tok, split="train")
    assert report.examples == report.samples > 0 and not report.missing_cache and not report.missing_features
    cached = CacheReader(student_cache).get([e.sample_id for e in examples[:6]])
    for e in examples[:6]:
        assert e.response_ids.tolist() == cached[e.sample_id]["token_ids"].tolist()
        assert e.response_ids[-1] == tok.eos_token_id
    batch = collate(examples[:6], tok.pad_token_id)
    # channel T: the token after each response position is the cached response token
    for b, e in enumerate(examples[:6]):
        n = len(e.response_ids)
        nxt = batch["text_ids"][b, batch["text_response_pos"][b, :n] + 1]
        assert nxt.tolist() == e.response_ids.tolist()
    # channel S: the embedding after each response position is that token's embedding
    model = SpeechLLM(StudentConfig(backbone=str(tiny_teacher), n_mels=40)).eval()
    embeds, attention, pos = speech_inputs(model, batch)
    for b, e in enumerate(examples[:6]):
        n = len(e.response_ids)
        got = embeds[b, pos[b, :n] + 1]
        torch.testing.assert_close(got, model.embed(torch.from_numpy(e.response_ids)))
        assert attention[b, pos[b, n - 1] + 1] == 1
    logits = torch.randn(embeds.shape[0], embeds.shape[1], 7)
    assert gather_positions(logits, pos).shape == (6, pos.shape[1], 7)


def test_missing_features_are_counted_not_silently_skipped(student_cache, tiny_teacher, tmp_path):
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from student.data import load_examples

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    full, _ = load_examples(student_cache, tok, split="train")
    dropped = full[0].sample_id
    features = tmp_path / "features"
    shutil.copytree(student_cache.parent / "features", features)
    for shard in features.glob("part-*.parquet"):
        t = pq.read_table(shard)
        pq.write_table(t.filter(pc.not_equal(t["sample_id"], dropped)), shard)
    (features / "manifest.json").unlink()  # rewritten by hand: a store without checksums (read with a note)
    examples, report = load_examples(student_cache, tok, features_dir=features, split="train")
    assert report.missing_features == [dropped]
    assert len(examples) == len(full) - 1 and dropped not in {e.sample_id for e in examples}
    assert "1 cached samples have no speech features" in report.summary()


def test_tokenizer_fingerprint_mismatch_is_refused(student_cache, tmp_path):
    from toy.teacher import train_tokenizer
    from student.data import TokenizerMismatch, load_examples

    other = train_tokenizer(["a completely different corpus", "with other merges"], 300)
    with pytest.raises(TokenizerMismatch, match="different tokenizer"):
        load_examples(student_cache, other)


# --- training ------------------------------------------------------------------------


def _cfg(cache, out, **kw):
    from student.train import TrainConfig

    # num_workers=0: this pytest process hosts a vLLM CPU engine, whose OpenMP runtime does not survive a fork
    # (a DataLoader worker hangs in its first torch op); the subprocess tests below run real workers.
    base = dict(logits=str(cache), out=str(out), steps=6, align_steps=2, batch_size=4, eval_every=0, save_every=2,
                warmup=2, seed=3, num_workers=0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_short_run_lowers_the_kd_loss(student_cache, tmp_path):
    from student.train import train

    train(_cfg(student_cache, tmp_path / "run", steps=40, align_steps=0, lr=3e-3, backbone_lr=1e-3, batch_size=8),
          progress=False, final_eval=False)  # fmt: skip
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    first = np.mean([float(r["kd_S"]) for r in rows[:5]])
    last = np.mean([float(r["kd_S"]) for r in rows[-5:]])
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "final" / "backbone" / "config.json").exists()
    assert (tmp_path / "run" / "final" / "speech.pt").exists()


def test_short_alignment_lowers_the_ctc_and_transcription_losses(student_cache, tmp_path):
    import csv

    from student.model import SpeechLLM
    from student.train import train

    train(_cfg(student_cache, tmp_path / "run", steps=40, align_steps=40, lr=3e-3, batch_size=8),
          progress=False, final_eval=False)  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert all(r["ctc"] and r["align"] and not r["kd_S"] for r in rows)
    # CTC learns fast; the transcription through the frozen backbone slowly (40 steps of batch 8 here)
    for key, factor in (("ctc", 0.8), ("align", 0.95)):
        first = np.mean([float(r[key]) for r in rows[:5]])
        last = np.mean([float(r[key]) for r in rows[-5:]])
        assert last < factor * first, (key, first, last)
    # the CTC head is saved with the speech side and comes back on load
    loaded = SpeechLLM.load(tmp_path / "run" / "final")
    assert loaded.ctc_head is not None
    # --ctc-weight 0: no head, no ctc column
    train(_cfg(student_cache, tmp_path / "noctc", steps=2, align_steps=2, ctc_weight=0.0),
          progress=False, final_eval=False)  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "noctc" / "metrics.csv")))
    assert rows and not any(r["ctc"] for r in rows)
    assert SpeechLLM.load(tmp_path / "noctc" / "final").ctc_head is None


def test_whisper_encoder_trains_from_whisper_features_and_refuses_fbank(student_cache, tiny_whisper, tmp_path):
    import csv

    from pipeline.features import FeatureConfig, extract_all
    from student.model import SpeechLLM
    from student.train import train

    with pytest.raises(ValueError, match="--kind whisper"):
        train(_cfg(student_cache, tmp_path / "fbank", encoder=str(tiny_whisper)), progress=False, final_eval=False)
    whisper_feats = tmp_path / "features_whisper"
    extract_all(student_cache.parent / "audio" / "index.parquet", whisper_feats, FeatureConfig(n_mels=40, kind="whisper"),
                progress=False)  # fmt: skip
    train(_cfg(student_cache, tmp_path / "run", encoder=str(tiny_whisper), features=str(whisper_feats), steps=4,
               align_steps=2), progress=False, final_eval=False)  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == 4 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert rows[0]["ctc"] and rows[-1]["kd_S"]
    loaded = SpeechLLM.load(tmp_path / "run" / "final")
    assert loaded.encoder.out_dim == 32 and loaded.cfg.encoder == str(tiny_whisper)


def test_finetune_fraction_keeps_whole_groups_and_evaluates_both_sides(student_cache, tmp_path):
    import csv

    from pipeline.samples import load_samples
    from student.inputs import RunInputs
    from student.train import TrainConfig, finetune_groups, train

    samples = RunInputs.open(student_cache, need_speech=False).samples
    assert finetune_groups(samples, TrainConfig(finetune_fraction=1.0)) is None
    group, kept = finetune_groups(samples, TrainConfig(finetune_fraction=0.5, seed=3))
    rows = load_samples(samples.dir).to_pylist()
    train_groups = {group[r["sample_id"]] for r in rows if r["split"] == "train"}
    assert len(kept) == round(0.5 * len(train_groups)) and kept < train_groups
    entity = {r["sample_id"]: json.loads(r["meta"])["entity"] for r in rows}
    assert all(group[sid] == entity[sid] for sid in group)  # a fact's templates, train and eval, stay together

    result = train(_cfg(student_cache, tmp_path / "run", finetune_fraction=0.5, steps=6, align_steps=2),
                   progress=False)  # fmt: skip
    assert 0 < result["finetune_examples"] < result["examples"]
    assert result["finetuned_n_eval"] > 0 and result["not_finetuned_n_eval"] > 0
    assert result["finetuned_n_eval"] + result["not_finetuned_n_eval"] == result["n_eval"]
    assert len(list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))) == 6


def test_final_eval_reports_a_held_out_voice_and_refuses_one_training_heard(student_cache, tmp_path):
    from pipeline.features import FeatureConfig, extract_all
    from pipeline.speech import Flite, synthesize_all
    from student.config import ConfigError
    from student.inputs import RunInputs
    from student.train import train

    inputs = RunInputs.open(student_cache, need_speech=False)
    samples_dir, features_dir = inputs.samples_dir, inputs.features_dir
    held = tmp_path / "features-held"
    synthesize_all(samples_dir, tmp_path / "audio-held", voices=("en-029",), rates=(160,), split="eval",
                   progress=False)  # fmt: skip
    extract_all(tmp_path / "audio-held" / "index.parquet", held, FeatureConfig(n_mels=40), progress=False)
    held_tts = tmp_path / "features-held-tts"  # the eval split spoken by another synthesizer
    synthesize_all(samples_dir, tmp_path / "audio-held-tts", Flite(), rates=(160,), split="eval", progress=False)
    extract_all(tmp_path / "audio-held-tts" / "index.parquet", held_tts, FeatureConfig(n_mels=40), progress=False)
    result = train(_cfg(student_cache, tmp_path / "run", heldout_features=str(held), finetune_fraction=0.5,
                        heldout_tts_features=str(held_tts)), progress=False)  # fmt: skip
    assert result["heldout_voice"] == "en-029"
    assert set(result["heldout_tts"].split(",")) <= set(Flite.default_voices)
    assert result["heldout_tts_n_eval"] == result["n_eval"]
    assert 0.0 <= result["heldout_tts_student_speech_accuracy"] <= 1.0
    assert (result["heldout_tts_finetuned_n_eval"] + result["heldout_tts_not_finetuned_n_eval"]
            == result["n_eval"])  # fmt: skip
    assert result["heldout_voice_n_eval"] == result["n_eval"] > 0
    assert 0.0 <= result["heldout_voice_student_speech_accuracy"] <= 1.0
    assert (result["heldout_voice_finetuned_n_eval"] + result["heldout_voice_not_finetuned_n_eval"]
            == result["n_eval"])  # fmt: skip
    # the training speech's own voice is no held-out voice
    with pytest.raises(ConfigError, match="also in the training speech"):
        train(_cfg(student_cache, tmp_path / "bad", heldout_features=str(features_dir)), progress=False)
    with pytest.raises(ConfigError, match="--heldout-tts-features .* also in the training speech"):
        train(_cfg(student_cache, tmp_path / "bad", heldout_tts_features=str(features_dir)), progress=False)


def test_resume_reproduces_the_next_steps_loss(student_cache, tmp_path):
    import csv

    from student.train import train

    train(_cfg(student_cache, tmp_path / "a"), progress=False, final_eval=False)
    train(_cfg(student_cache, tmp_path / "b", stop_after=2), progress=False, final_eval=False)
    train(_cfg(student_cache, tmp_path / "b", resume=True), progress=False, final_eval=False)
    a = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    b = list(csv.DictReader(open(tmp_path / "b" / "metrics.csv")))
    assert [r["step"] for r in b] == [str(i) for i in range(1, 7)]
    assert b[1]["align"] and not b[1]["kd_S"] and b[2]["kd_S"]  # resumed across the alignment -> KD boundary
    for ra, rb in zip(a[2:], b[2:]):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-6, abs=1e-7)


def test_training_process_never_imports_vllm(student_cache, tmp_path):
    code = (
        "import sys; from student.train import main; "
        f"main(['--logits', '{student_cache}', '--out', '{tmp_path / 'run'}', '--steps', '2', '--align-steps', '1', "
        "'--batch-size', '2', '--eval-every', '0']); "
        "print('VLLM_LOADED' if any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules) else 'NO_VLLM')"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NO_VLLM" in r.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert 0 <= result["student_speech_accuracy"] <= 1 and "forgetting" in result


# --- issue 8: scale (devices, DDP, streaming, any backbone, padding, config) -----------------------------


def test_losses_are_finite_and_equal_with_inf_or_zero_padding():
    torch.manual_seed(4)
    B, T, V, k = 2, 5, 30, 6
    student = torch.randn(B, T, V, requires_grad=True)
    lp = torch.log_softmax(torch.randn(B, T, V) * 2, -1).topk(k, dim=-1)
    tail = torch.log1p(-lp.values.exp().sum(-1))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False
    results = {}
    for pad in (float("-inf"), 0.0):
        t_lp = lp.values.clone().masked_fill(~mask[..., None], pad)
        t_tail = tail.clone().masked_fill(~mask, pad)
        ids = lp.indices.masked_fill(~mask[..., None], 0)
        for name, fn in losses.KD_LOSSES.items():
            if name == "sampled":  # takes ids + counts, not logprobs: its padding is tested with its estimator
                continue
            student.grad = None
            value = fn(student, ids, t_lp, mask, tau=2.0, tail_logmass=t_tail)
            value.backward()
            assert torch.isfinite(value) and torch.isfinite(student.grad).all(), (name, pad)
            assert student.grad[0, 2:].abs().max() == 0  # padded positions get no gradient
            results.setdefault(name, []).append(value.item())
    for name, (inf_padded, zero_padded) in results.items():
        assert inf_padded == pytest.approx(zero_padded, rel=1e-6), name
    # and equal to the same positions without any padding (the real rows alone)
    ref = losses.forward_kl_topk(student[1:], lp.indices[1:], lp.values[1:], mask[1:], tau=2.0)
    part = losses.forward_kl_topk(student[:1, :2], lp.indices[:1, :2], lp.values[:1, :2], mask[:1, :2], tau=2.0)
    both = (ref * 5 + part * 2) / 7
    assert results["forward_kl"][0] == pytest.approx(both.item(), rel=1e-5)


def test_streaming_batches_are_deterministic_and_ranks_split_them_disjointly(student_cache, tiny_teacher):
    from transformers import AutoTokenizer

    from student.data import BlockShuffleSampler, StepBatches, StudentData, shard_of_batch

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    data = StudentData.open(student_cache, tok)
    every = np.arange(len(data))
    a = BlockShuffleSampler(every, data.block_of(), 8, seed=5, window=2)
    b = BlockShuffleSampler(every, data.block_of(), 8, seed=5, window=2)
    for step in (0, 1, a.per_epoch, 3 * a.per_epoch + 1):  # within and across epochs, built in any order
        assert a.indices(step).tolist() == b.indices(step).tolist()
        assert len(set(a.indices(step).tolist())) == 8
    epoch0 = np.concatenate([a.indices(s) for s in range(a.per_epoch)])
    assert len(set(epoch0.tolist())) == len(epoch0)  # an epoch visits each example at most once
    # two ranks x two micro-batches: disjoint, and together the global batch
    g = a.indices(2)
    shares = [part for r in range(2) for part in shard_of_batch(g, r, 2, 2)]
    assert sorted(np.concatenate(shares).tolist()) == sorted(g.tolist())
    assert sum(len(p) for p in shares) == len(g)
    # a step's batch read by a fresh dataset (a resumed run, a worker process) is the same tensors
    s1 = StepBatches(data, [(0, a)], tok.pad_token_id)[3][0]
    s2 = StepBatches(StudentData.open(student_cache, tok), [(0, b)], tok.pad_token_id)[3][0]
    assert s1.keys() == s2.keys()
    for key in s1:  # tensors, and the layouts (clip numbers, text pieces) channel S is assembled from
        same = torch.equal(s1[key], s2[key]) if torch.is_tensor(s1[key]) else s1[key] == s2[key]
        assert same, key


def test_grad_accumulation_steps_like_one_batch(student_cache, tiny_teacher, tmp_path):
    """The gradient of a global batch taken as 4 micro-batches is the gradient of the batch at once (within float
    rounding), in both phases; and whole runs end with the same parameters (Adam's first steps, sign(g)-like for
    near-zero gradients, amplify that rounding: hence a wider tolerance there than on the gradients)."""
    from transformers import AutoTokenizer

    from student.data import StudentData, collate
    from student.distributed import Dist
    from student.model import SpeechLLM, StudentConfig
    from student.objective import Objective, step_norms, total_loss
    from student.train import TrainConfig, train

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    data = StudentData.open(student_cache, tok)
    examples = [data.example(i) for i in range(8)]
    cfg = TrainConfig(logits=str(student_cache), encoder_dropout=0.0, loss_chunk=8).for_targets(data.reader.fingerprint)
    torch.manual_seed(0)
    model = SpeechLLM(StudentConfig(backbone=str(tiny_teacher), n_mels=40, dropout=0.0))
    objective, ranks = Objective(model, cfg), Dist("cpu")
    for aligning in (True, False):
        grads = []
        for parts in ([examples], [examples[i : i + 2] for i in range(0, 8, 2)]):
            micro = [collate(p, tok.pad_token_id) for p in parts]
            norms = step_norms(micro, ranks)
            model.zero_grad()
            for batch in micro:
                total_loss(objective(batch, aligning, norms), cfg).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        one, accum = grads
        assert one.keys() == accum.keys() and len(one) > 10
        for name in one:
            scale = one[name].abs().max().clamp_min(1e-12)
            assert ((one[name] - accum[name]).abs().max() / scale) < 1e-5, (aligning, name)

    common = dict(steps=4, align_steps=2, batch_size=8, encoder_dropout=0.0, num_workers=0, save_every=4)
    train(_cfg(student_cache, tmp_path / "one", **common), progress=False, final_eval=False)
    train(_cfg(student_cache, tmp_path / "accum", grad_accum=4, **common), progress=False, final_eval=False)
    _assert_same_parameters(tmp_path / "one", tmp_path / "accum", atol=1e-4)


def _assert_same_parameters(run_a: Path, run_b: Path, atol: float = 2e-5) -> None:
    from student.checkpoint import choose, model_state

    a, b = model_state(run_a), model_state(run_b)
    assert a.keys() == b.keys()
    assert choose(run_a).name == choose(run_b).name  # the same step
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)
        moved += 1
    assert moved > 10


def _torchrun(args: list[str], nproc: int, cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "student" / "train.py"), *args]  # fmt: skip
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def _ddp_args(cache, out, *extra) -> list[str]:
    return ["--logits", str(cache), "--out", str(out), "--steps", "6", "--align-steps", "2", "--batch-size", "8",
            "--warmup", "1", "--eval-every", "0", "--save-every", "2", "--encoder-dropout", "0", "--num-workers", "0",
            "--seed", "3", "--device", "cpu", "--no-final-eval", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_runs(student_cache, tmp_path_factory):
    """One process with global batch 8 and two gloo ranks with the same global batch, real torchrun."""
    root = tmp_path_factory.mktemp("ddp")
    _torchrun(_ddp_args(student_cache, root / "one"), nproc=1)
    r = _torchrun(_ddp_args(student_cache, root / "two"), nproc=2)
    return root, r


def test_two_gloo_ranks_step_like_one_process(ddp_runs):
    import csv

    root, r = ddp_runs
    assert "2 rank(s), global batch 8 = 2 x 1 x 4" in r.stdout
    _assert_same_parameters(root / "one", root / "two")
    one = list(csv.DictReader(open(root / "one" / "metrics.csv")))
    two = list(csv.DictReader(open(root / "two" / "metrics.csv")))  # rank 0 alone wrote it, once per step
    assert [x["step"] for x in two] == [str(i) for i in range(1, 7)]
    for x, y in zip(one, two):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-4)


def test_a_distributed_run_resumes_exactly(ddp_runs, student_cache):
    import csv

    root, _ = ddp_runs
    _torchrun(_ddp_args(student_cache, root / "resumed", "--stop-after", "3"), nproc=2)
    assert len(list(csv.DictReader(open(root / "resumed" / "metrics.csv")))) == 3
    _torchrun(_ddp_args(student_cache, root / "resumed", "--resume"), nproc=2)
    full = list(csv.DictReader(open(root / "two" / "metrics.csv")))
    resumed = list(csv.DictReader(open(root / "resumed" / "metrics.csv")))
    assert [x["step"] for x in resumed] == [str(i) for i in range(1, 7)]
    for x, y in zip(full, resumed):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-6, abs=1e-7)
    _assert_same_parameters(root / "two", root / "resumed", atol=1e-6)


def test_bad_options_fail_before_any_model_or_data_is_loaded(student_cache, tmp_path):
    cases = [
        (["--kd", "forward-kl"], "forward_kl"),
        (["--ce-channels", "T,X"], "--ce-channels"),
        (["--batch-size", "6", "--grad-accum", "4"], "not divisible"),
        (["--align-steps", "900", "--steps", "10"], "--align-steps"),
        (["--logits", str(tmp_path / "nowhere")], "no cache there"),
        (["--resume", "--out", str(tmp_path / "fresh")], "no checkpoint"),
    ]
    for args, needle in cases:
        full = ["--logits", str(student_cache), *args] if "--logits" not in args else args
        r = subprocess.run([sys.executable, str(REPO / "student" / "train.py"), *full], cwd=REPO, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert "student data" not in r.stdout  # nothing was loaded
        assert len(r.stderr.strip().splitlines()[-1]) > 20


def test_a_corrupt_feature_clip_read_in_a_dataloader_worker_is_one_line_naming_it(student_cache, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = tmp_path / "features"
    shutil.copytree(student_cache.parent / "features", features)
    for shard in features.glob("part-*.parquet"):  # every clip one float16 short: the first batch meets one
        t = pq.read_table(shard)
        short = pa.array([b[:-2] for b in t["fbank"].to_pylist()], pa.binary())
        pq.write_table(t.set_column(t.schema.get_field_index("fbank"), t.schema.field("fbank"), short), shard)
    r = subprocess.run([sys.executable, str(REPO / "student" / "train.py"), "--logits", str(student_cache),
                        "--features", str(features), "--out", str(tmp_path / "run"), "--steps", "2",
                        "--align-steps", "1", "--batch-size", "4", "--eval-every", "0", "--num-workers", "1",
                        "--no-verify"],  # past the checksums (tested apart): the clip's own check, in a worker
                       cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 5, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") or last.startswith("student.train: error: "), last
    assert "part-0000" in last and "clip '" in last and "mels" in last and "(in DataLoader worker process" in last


def test_a_relative_cache_trains_from_another_directory_with_a_second_architecture(
    student_cache, samples_dir, tiny_teacher, vllm_engine, tmp_path, monkeypatch
):
    """A cache written with paths relative to its writer's working directory (as `make demo` does), moved,
    read from elsewhere; the backbone a tiny random Phi-3 (fused qkv, another architecture than the Llama
    teacher) sharing the teacher's tokenizer. (Not Qwen2: transformers 5 loads any tokenizer beside a qwen2
    config as Qwen2Tokenizer, with Qwen's own pre-tokenizer, and the cache's tokenizer check rightly refuses it.)"""
    import shutil

    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from pipeline.teacher import cache_teacher_logits
    from tests.helpers import tiny_teacher_config

    proj = tmp_path / "proj"
    shutil.copytree(samples_dir, proj / "data" / "samples")
    shutil.copytree(student_cache.parent / "features", proj / "data" / "features")
    shutil.copytree(tiny_teacher, proj / "data" / "models" / "teacher")
    monkeypatch.chdir(proj)
    cfg = tiny_teacher_config("data/models/teacher", samples="data/samples", out="data/cache",
                              features="data/features", top_k=8)  # fmt: skip
    cache_teacher_logits(cfg, progress=False, llm=vllm_engine)
    manifest = json.loads((proj / "data" / "cache" / "manifest.json").read_text())
    assert manifest["inputs"]["samples_dir"] == "../samples"  # relative to the manifest, not the writer's cwd
    moved = tmp_path / "moved"
    shutil.move(str(proj), moved)
    tok = AutoTokenizer.from_pretrained(moved / "data" / "models" / "teacher")
    phi = tmp_path / "phi3-tiny"
    cfg2 = Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)  # fmt: skip
    Phi3ForCausalLM(cfg2).save_pretrained(phi)
    tok.save_pretrained(phi)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(
        [sys.executable, str(REPO / "student" / "train.py"), "--logits", str(moved / "data" / "cache"), "--out", "run",
         "--backbone", str(phi), "--steps", "3", "--align-steps", "1", "--batch-size", "4", "--eval-every", "0",
         "--num-workers", "1"],
        cwd=elsewhere, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((elsewhere / "run" / "result.json").read_text())
    assert result["steps"] == 3 and 0 <= result["student_speech_accuracy"] <= 1
    assert json.loads((elsewhere / "run" / "final" / "backbone" / "config.json").read_text())["model_type"] == "phi3"


def _draws(teacher_logits: torch.Tensor, tau: float, n: int, gen: torch.Generator):
    """n ids per position drawn from softmax(teacher / tau), as distinct ids + counts padded to one width."""
    B, T, V = teacher_logits.shape
    probs = torch.softmax(teacher_logits / tau, -1).reshape(-1, V)
    drawn = torch.multinomial(probs, n, replacement=True, generator=gen)
    counts = torch.zeros(B * T, V).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.float))
    m = int((counts > 0).sum(1).max())
    top = counts.topk(m, dim=1)  # the drawn ids first; slots past them have count 0
    return top.indices.reshape(B, T, m), top.values.reshape(B, T, m)


def test_sampled_kd_is_an_unbiased_estimate_of_the_dense_cross_entropy():
    from student import losses

    gen = torch.Generator().manual_seed(0)
    B, T, V, tau = 2, 5, 40, 2.0
    teacher = torch.randn(B, T, V, generator=gen) * 3
    student = torch.randn(B, T, V, generator=gen, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False  # padding: ignored
    dense = losses.dense_ce(student, teacher, mask, tau)
    (dense_grad,) = torch.autograd.grad(dense, student)
    # few draws (RS-KD's ~12 per position), averaged over many independent caches: the mean converges to dense
    estimates, grads = [], []
    for _ in range(1000):
        ids, counts = _draws(teacher, tau, 12, gen)
        loss = losses.sampled_ce(student, ids, counts, mask, tau)
        estimates.append(loss.item())
        grads.append(torch.autograd.grad(loss, student)[0])
    mean, sem = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
    assert abs(mean - dense.item()) < 4 * sem + 1e-3, (mean, dense.item(), sem)
    mean_grad = torch.stack(grads).mean(0)
    assert torch.allclose(mean_grad, dense_grad, atol=5e-3), (mean_grad - dense_grad).abs().max()
    assert mean_grad[1, 3:].abs().max() == 0  # no gradient through padded positions
    # one estimate with many draws is close to the dense value; the top-k renormalized target is not unbiased
    ids, counts = _draws(teacher, tau, 20000, gen)
    assert losses.sampled_ce(student, ids, counts, mask, tau).item() == pytest.approx(dense.item(), rel=0.01)


def test_a_sampled_cache_trains_with_rs_kd_at_its_draw_temperature(student_cache, samples_dir, tiny_teacher,
                                                                  vllm_engine, tmp_path):  # fmt: skip
    import csv

    from transformers import AutoTokenizer

    from pipeline.teacher import cache_teacher_logits
    from student.config import ConfigError
    from student.data import StudentData, collate
    from student.train import train
    from tests.helpers import tiny_teacher_config

    cache = tmp_path / "cache-sampled"
    cache_teacher_logits(tiny_teacher_config(tiny_teacher, samples=samples_dir, out=cache, targets="sampled", draws=12,
                                             features=student_cache.parent / "features"), False, vllm_engine)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    data = StudentData.open(cache, tok)
    batch = collate([data.example(i) for i in range(6)], tok.pad_token_id or 0)
    assert "topk_ids" not in batch and batch["draw_ids"].shape[:2] == batch["mask"].shape
    assert (batch["draw_counts"].sum(-1)[batch["mask"]] == 12).all()  # N draws at every real position
    assert (batch["draw_counts"].sum(-1)[~batch["mask"]] == 0).all()  # none at padding

    # a top-k loss, another temperature, or sampled KD against a top-k cache: refused, saying why
    with pytest.raises(ConfigError, match="holds sampled targets"):
        train(_cfg(cache, tmp_path / "bad", kd="forward_kl"), progress=False, final_eval=False)
    with pytest.raises(ConfigError, match="drawn at temperature 1"):
        train(_cfg(cache, tmp_path / "bad", tau=2.0), progress=False, final_eval=False)
    with pytest.raises(ConfigError, match="needs a cache made with --targets sampled"):
        train(_cfg(student_cache, tmp_path / "bad", kd="sampled"), progress=False, final_eval=False)

    train(_cfg(cache, tmp_path / "run", steps=40, align_steps=0, lr=3e-3, backbone_lr=1e-3, batch_size=8),
          progress=False, final_eval=False)  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    first = np.mean([float(r["kd_S"]) for r in rows[:5]])
    last = np.mean([float(r["kd_S"]) for r in rows[-5:]])
    # the loss estimates the cross-entropy H(p) + KL(p || q): the KL part is what training can remove. H(p): the
    # teacher's mean entropy over the training responses' positions, from a transformers forward.
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    entropies = []
    for i in range(len(data)):
        e = data.example(i, targets=False)
        ids = torch.tensor([e.text_ids])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(ids).logits[0, torch.from_numpy(e.text_pos)].double(), -1)
        entropies.extend((-(logp.exp() * logp).sum(-1)).tolist())
    entropy = float(np.mean(entropies))
    print(f"sampled KD (S channel): first 5 steps {first:.3f}, last 5 {last:.3f}, teacher entropy {entropy:.3f}")
    assert entropy < last < first and last - entropy < 0.7 * (first - entropy), (first, last, entropy)
