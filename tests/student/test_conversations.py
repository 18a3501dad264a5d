"""Students on conversations: every cached assistant turn is trained on in its place, each spoken user turn's speech
sits in its turn's place in channel S (the composed student's stored features, a speech LLM's processor), and the
system prompt and earlier answers stay text."""

from __future__ import annotations

import csv
import math

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.chat import conversation
from pipeline.samples import load_samples


def _check_text_channel(batch, examples):
    for b, e in enumerate(examples):
        n = len(e.response_ids)
        nxt = batch["text_ids"][b, batch["text_response_pos"][b, :n] + 1]
        assert nxt.tolist() == e.response_ids.tolist()


def test_the_composed_student_hears_each_spoken_turn_in_its_place_and_trains_on_every_turn(chat_cache, chat_samples,
                                                                                          tiny_teacher, tmp_path):  # fmt: skip
    from transformers import AutoTokenizer

    from student.data import StudentData, collate, speech_inputs
    from student.model import SpeechLLM, StudentConfig
    from student.train import TrainConfig, train

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    data = StudentData.open(chat_cache, tok)
    samples = {s["sample_id"]: s for s in load_samples(chat_samples).to_pylist()}
    rows = {r["sample_id"]: r for r in (CacheReader(chat_cache).decode_row(r) for r in CacheReader(chat_cache).iter_rows())}
    assert len(data) == len(samples) == 8
    examples = [data.example(i) for i in range(4)]
    for e in examples:
        turns = conversation(samples[e.sample_id])
        row = rows[e.sample_id]
        assert e.response_ids.tolist() == row["token_ids"].tolist() and len(row["turn_lengths"]) == 2
        # channel T is the teacher's own sequence: the scored turns start where the cache says
        assert (e.text_pos[np.cumsum(row["turn_lengths"]) - row["turn_lengths"]] + 1).tolist() == \
            row["turn_starts"].tolist()
        assert [s[0] for s in e.speech_segments if s[0] != "ids"] == ["clip", "response", "clip", "response"]
        assert len(e.clips) == 2 and [tok.decode(t[:-1]) for t in e.transcripts] == [turns[1]["content"],
                                                                                   turns[3]["content"]]  # fmt: skip
        # what stays text in channel S: the system prompt (and the first answer, as cached tokens)
        text = tok.decode([i for s in e.speech_segments if s[0] == "ids" for i in s[1]])
        assert turns[0]["content"] in text and turns[1]["content"] not in text and turns[3]["content"] not in text
    batch = collate(examples, tok.pad_token_id)
    _check_text_channel(batch, examples)
    assert batch["speech"].shape[0] == batch["transcript_ids"].shape[0] == 8  # 2 clips an example
    model = SpeechLLM(StudentConfig(backbone=str(tiny_teacher), n_mels=40)).eval()
    with torch.no_grad():
        embeds, attention, pos = speech_inputs(model, batch)
        speech, lengths = model.speech_embeddings(batch["speech"], batch["speech_lengths"])
    for b, e in enumerate(examples):
        n = len(e.response_ids)
        torch.testing.assert_close(embeds[b, pos[b, :n] + 1], model.embed(torch.from_numpy(e.response_ids)))
        # each turn's speech is in its place: the first clip before the first answer, the second between the two
        first, second = (int(pos[b, a]) + 1 for a in (0, int(rows[e.sample_id]["turn_lengths"][0])))
        for clip, (lo, hi) in ((2 * b, (0, first)), (2 * b + 1, (first, second))):
            at = [t for t in range(embeds.shape[1]) if torch.equal(embeds[b, t], speech[clip, 0])]
            assert len(at) == 1 and lo <= at[0] < hi and attention[b, at[0]] == 1

    cfg = TrainConfig(logits=str(chat_cache), out=str(tmp_path / "run"), steps=4, align_steps=1, batch_size=4,
                      eval_every=0, save_every=2, warmup=1, seed=3, num_workers=0)  # fmt: skip
    result = train(cfg, progress=False, final_eval=False)
    metrics = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert result["examples"] == 8 and len(metrics) == 4
    assert all(math.isfinite(float(r["kd_S"])) and math.isfinite(float(r["kd_T"])) for r in metrics[1:])


def test_a_speech_llm_gets_an_audio_part_per_spoken_turn(chat_cache, tiny_teacher, tmp_path):
    from transformers import AutoProcessor

    from student.data import SpeechLLMPrompts, StudentData, collate
    from toy.speech_llm import SpeechLLMBuild, build

    student = build(SpeechLLMBuild(kind="qwen2-audio", teacher=str(tiny_teacher), out=str(tmp_path / "qa"),
                                   hidden_size=32))  # fmt: skip
    processor = AutoProcessor.from_pretrained(student)
    data = StudentData.open(chat_cache, processor.tokenizer, prompts=SpeechLLMPrompts(processor))
    examples = [data.example(i) for i in range(2)]
    reader = CacheReader(chat_cache)
    rows = {r["sample_id"]: reader.decode_row(r) for r in reader.iter_rows()}
    audio_id = processor.tokenizer.convert_tokens_to_ids(processor.audio_token)
    for e in examples:
        assert len(e.input_features) == 2  # one per spoken turn
        ids = np.asarray(e.speech_ids)
        runs = np.flatnonzero(np.diff(np.r_[0, (ids == audio_id).astype(int), 0]) == 1)  # where each run starts
        assert len(runs) == 2  # two audio placeholders, each expanded to its clip's length
        first, second = (e.speech_pos[a] + 1 for a in (0, rows[e.sample_id]["turn_lengths"][0]))
        assert runs[0] < first < runs[1] < second  # each spoken turn before its answer
    batch = collate(examples, processor.tokenizer.pad_token_id)
    assert batch["input_features"].shape[0] == 4
    for key, pos_key in (("speech_ids", "speech_response_pos"), ("text_ids", "text_response_pos")):
        for b, e in enumerate(examples):
            n = len(e.response_ids)
            assert batch[key][b, batch[pos_key][b, :n] + 1].tolist() == e.response_ids.tolist()
