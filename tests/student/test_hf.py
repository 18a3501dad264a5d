"""Real speech-LLM students: tiny random Qwen2-Audio and Qwen2.5-Omni thinkers (built locally from configs, the toy
teacher's tokenizer plus their audio tokens) distilled from the toy cache; the tokenizer rule; LoRA through peft."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from student.checkpoint import model_state
from tests.helpers import REPO

KINDS = ("qwen2-audio", "qwen2.5-omni")


@pytest.fixture(scope="module")
def speech_llms(tiny_teacher, tmp_path_factory) -> dict:
    from toy.speech_llm import SpeechLLMBuild, build

    root = tmp_path_factory.mktemp("speech-llms")
    return {kind: build(SpeechLLMBuild(kind=kind, teacher=str(tiny_teacher), out=str(root / kind), hidden_size=32))
            for kind in KINDS}  # fmt: skip


def _cfg(cache, student, out, **kw):
    from student.config import TrainConfig

    base = dict(logits=str(cache), student=str(student), out=str(out), steps=4, batch_size=4, eval_every=0,
                save_every=2, warmup=1, seed=3, num_workers=0, lr=1e-2, backbone_lr=1e-2, eval_limit=8)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _fixed_batch(cache, student_dir, n: int = 4):
    """A collated batch of the first n training examples through the student's own processor."""
    from transformers import AutoProcessor

    from student.data import SpeechLLMPrompts, StudentData, collate

    processor = AutoProcessor.from_pretrained(student_dir)
    data = StudentData.open(cache, processor.tokenizer, prompts=SpeechLLMPrompts(processor))
    return collate([data.example(i) for i in range(n)], processor.tokenizer.pad_token_id)


def _loss(model, batch) -> float:
    from student.config import TrainConfig
    from student.objective import channel_losses

    cfg = TrainConfig(student="x", kd="forward_kl", tau=2.0)
    norms = {"response": float(batch["mask"].sum()), "transcript": 1.0, "clips": 1.0}
    with torch.no_grad():
        parts = channel_losses(model, batch, cfg, norms)
    assert set(parts) == {"kd_T", "kd_S", "ce_T", "ce_S"}
    return sum(float(v) for v in parts.values())


@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_speech_llm_trains_on_both_channels_evaluates_saves_and_reloads(kind, speech_llms, student_cache,
                                                                              tmp_path):  # fmt: skip
    from student.hf import HFStudentConfig, load_pretrained
    from student.interface import load_student
    from student.train import train

    student = speech_llms[kind]
    batch = _fixed_batch(student_cache, student)
    # channel S: the processor expanded the audio placeholder and gave the features; the response follows
    assert batch["input_features"].shape[1] == 128 and batch["feature_attention_mask"].sum() > 0
    for b in range(4):
        n = int(batch["mask"][b].sum())
        nxt = batch["speech_ids"][b, batch["speech_response_pos"][b, :n] + 1]
        assert nxt.tolist() == batch["response_ids"][b, :n].tolist()
        nxt = batch["text_ids"][b, batch["text_response_pos"][b, :n] + 1]
        assert nxt.tolist() == batch["response_ids"][b, :n].tolist()
    before = _loss(load_pretrained(str(student), HFStudentConfig(base=str(student))).eval(), batch)
    result = train(_cfg(student_cache, student, tmp_path / "run", steps=12, freeze_encoder=False), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert len(rows) == 12 and all(r["kd_T"] and r["kd_S"] and r["ce_T"] and r["ce_S"] for r in rows)
    assert result["student_kind"] == "hf" and result["n_eval"] > 0  # the final eval ran, typed and spoken
    assert 0.0 <= result["student_speech_accuracy"] <= 1.0 and "heldout_voice_student_speech_accuracy" not in result
    reloaded = load_student(tmp_path / "run" / "final").eval()
    after = _loss(reloaded, batch)
    assert after < before - 0.05, (before, after)  # the loss fell on a fixed batch
    # the saved student is the trained one: its outputs equal the checkpoint's
    from student.interface import build_student

    state = model_state(tmp_path / "run")
    again = build_student(_cfg(student_cache, student, tmp_path / "x"), None, None, "cpu")
    again.load_state_dict(state)
    assert _loss(again.eval(), batch) == pytest.approx(after, abs=1e-5)
    check = json.loads((tmp_path / "run" / "tokenizer_check.json").read_text())
    assert not check["identical"] and check["student_extra_ids"] >= 3 and check["dropped"] == {}


def test_the_tokenizer_rule_accepts_added_specials_drops_a_reused_one_and_refuses_a_moved_token(tiny_teacher,
                                                                                                  tmp_path):  # fmt: skip
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from student.vocab import TokenizerMismatch, check_vocab
    from toy.speech_llm import extended_tokenizer

    teacher = AutoTokenizer.from_pretrained(tiny_teacher)
    extended = extended_tokenizer(str(tiny_teacher), "qwen2-audio")
    check = check_vocab(teacher, extended)
    assert not check.identical and check.student_extra_ids == 3 and not check.dropped

    def edited(change) -> PreTrainedTokenizerFast:
        state = json.loads(teacher.backend_tokenizer.to_str())
        change(state)
        from tokenizers import Tokenizer

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), eos_token="<|end|>",
                                      pad_token="<|pad|>")  # fmt: skip
        tok.chat_template = teacher.chat_template
        return tok

    # a multimodal student that reuses a reserved id: <|pad|> (special, in no chat turn) means <|AUDIO|> to it
    def reuse_pad(state):
        for t in state["added_tokens"]:
            if t["content"] == "<|pad|>":
                t["content"] = "<|AUDIO|>"
        vocab = state["model"]["vocab"]
        vocab["<|AUDIO|>"] = vocab.pop("<|pad|>")

    pad = teacher.pad_token_id
    check = check_vocab(teacher, edited(reuse_pad))
    assert check.dropped == {pad: ["<|pad|>", "<|AUDIO|>"]} and "dropped from the KD targets" in check.summary()

    # an ordinary token at another id: refused, naming the id and both tokens
    def swap(state):
        vocab = state["model"]["vocab"]
        a, b = sorted((t, i) for t, i in vocab.items() if i > 300)[:2]
        vocab[a[0]], vocab[b[0]] = b[1], a[1]

    with pytest.raises(TokenizerMismatch, match=r"token id \d+ is the token '.+' to the teacher but '.+' to the student"):
        check_vocab(teacher, edited(swap))

    # the end of turn (the responses' last token) must mean the same: refused, not dropped
    def end_elsewhere(state):
        for t in state["added_tokens"]:
            if t["content"] == "<|end|>":
                t["content"] = "<|eot|>"
        vocab = state["model"]["vocab"]
        vocab["<|eot|>"] = vocab.pop("<|end|>")

    with pytest.raises(TokenizerMismatch, match=r"the special token '<\|end\|>' to the teacher but '<\|eot\|>'"):
        check_vocab(teacher, edited(end_elsewhere))


def test_a_dropped_id_is_never_trained_toward_and_a_response_token_that_is_one_is_refused(student_cache,
                                                                                           tiny_teacher):  # fmt: skip
    from transformers import AutoTokenizer

    from student.data import StudentData, TokenizerMismatch
    from student.vocab import VocabCheck

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    data = StudentData.open(student_cache, tok)
    ex = data.example(0)
    dropped = int(ex.topk_ids[0, 1])  # an id in the first position's top-k, not the response token there
    data.vocab = VocabCheck(False, len(tok), len(tok), dropped={dropped: ["x", "y"]})
    data.dropped = np.array([dropped])
    if dropped in ex.response_ids:
        pytest.skip("the chosen id is a response token of this example")
    ex = data.example(0)
    assert ex.dropped_targets == int((ex.topk_ids == dropped).sum()) >= 1
    assert np.isneginf(ex.topk_logprobs[ex.topk_ids == dropped]).all()
    data.dropped = np.array([int(ex.response_ids[0])])
    data.vocab.dropped = {int(ex.response_ids[0]): ["x", "y"]}
    with pytest.raises(TokenizerMismatch, match="its cached response has token id"):
        data.example(0)


def test_lora_trains_only_its_adapters_resumes_exactly_and_merges_to_the_same_logits(speech_llms, student_cache,
                                                                                     tmp_path):  # fmt: skip
    from peft import PeftModel

    from student.hf import HFStudentConfig, load_pretrained, model_class
    from student.interface import load_student
    from student.train import train

    student = speech_llms["qwen2-audio"]
    cfg = dict(lora_rank=4, lora_alpha=8, steps=6, save_every=3, merge=True)
    train(_cfg(student_cache, student, tmp_path / "full", **cfg), progress=False, final_eval=False)
    base = model_class(str(student)).from_pretrained(student).state_dict()
    state = model_state(tmp_path / "full")
    def original(key: str) -> str:  # the base model's name of a PEFT-wrapped weight
        return key.replace("model.base_model.model.", "", 1).replace(".base_layer", "").replace(".original_module", "")

    changed = {k for k, v in state.items() if "lora_" not in k and "modules_to_save" not in k
               and not torch.equal(v, base[original(k)])}  # fmt: skip
    assert not changed, sorted(changed)[:5]  # the base weights stayed
    lora = {k for k in state if "lora_B" in k}
    assert lora and all(state[k].abs().sum() > 0 for k in lora)  # the adapters trained (B starts at zero)
    assert any("language_model" in k for k in lora) and not any("audio_tower" in k for k in lora)
    final = tmp_path / "full" / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    # resume: stopped after 3 steps, resumed, the same losses as uninterrupted
    train(_cfg(student_cache, student, tmp_path / "sliced", **cfg, stop_after=3), progress=False, final_eval=False)
    train(_cfg(student_cache, student, tmp_path / "sliced", **cfg, resume=True), progress=False, final_eval=False)
    full = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "full" / "metrics.csv"))]
    sliced = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "sliced" / "metrics.csv"))]
    assert sliced[-3:] == pytest.approx(full[-3:], rel=1e-6, abs=1e-7)
    # merge: the merged plain model gives the adapted model's logits
    adapted = load_student(final).eval()
    assert isinstance(adapted.model, PeftModel)
    merged = load_pretrained(str(final / "merged"), HFStudentConfig(base=str(final / "merged"))).eval()
    batch = _fixed_batch(student_cache, student, 2)
    with torch.no_grad():
        for channel in ("T", "S"):
            a = adapted.response_hidden(batch, channel) @ adapted.head()[0].T
            b = merged.response_hidden(batch, channel) @ merged.head()[0].T
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "student" / "train.py"), *args]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def test_two_gloo_ranks_with_lora_step_like_one_process(speech_llms, student_cache, tmp_path):
    args = lambda out: ["--logits", str(student_cache), "--student", str(speech_llms["qwen2-audio"]), "--out",  # noqa: E731
                        str(out), "--lora-rank", "4", "--steps", "3", "--batch-size", "4", "--lr", "1e-2",
                        "--backbone-lr", "1e-2", "--warmup", "1", "--eval-every", "0", "--save-every", "3",
                        "--num-workers", "0", "--seed", "3", "--device", "cpu", "--no-final-eval"]  # fmt: skip
    _torchrun(args(tmp_path / "one"), 1)
    r = _torchrun(args(tmp_path / "two"), 2)
    assert "2 rank(s), global batch 4 = 2 x 1 x 2" in r.stdout
    one, two = model_state(tmp_path / "one"), model_state(tmp_path / "two")
    moved = 0
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=2e-5, rtol=1e-4, msg=key)
        moved += "lora_" in key
    assert moved > 4
    a = [float(x["loss"]) for x in csv.DictReader(open(tmp_path / "one" / "metrics.csv"))]
    b = [float(x["loss"]) for x in csv.DictReader(open(tmp_path / "two" / "metrics.csv"))]
    assert a == pytest.approx(b, rel=1e-4)
