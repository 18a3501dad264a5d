"""Chat samples end to end on the pipeline side: conversations and Open-Orca rows ingested (bad ones rejected with
the field named), the turns the chat template cuts, what the speech stage speaks, the cache's --turns spans, and
one-pass teacher responses against a greedy generation and a rescoring."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cache import CacheReader, FingerprintMismatch
from pipeline.chat import conversation, encode_conversation, segments, to_score
from pipeline.samples import FieldMap, ingest, load_samples
from pipeline.speech import EspeakNG, synthesize_all
from tests.helpers import SYSTEM_PROMPT, chat_rows, run, tiny_teacher_config


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_conversations_and_open_orca_rows_ingest_and_bad_conversations_are_rejects(tiny_rows, tmp_path):
    good = chat_rows(tiny_rows, 2)
    sharegpt = {"sample_id": "sg", "messages": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
    open_end = {"sample_id": "open", "messages": [{"role": "system", "content": "S."}, {"role": "user", "content": "Q?"}]}
    user, bot = {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}
    bad = [
        {"sample_id": "role", "messages": [user, {"role": "bot", "content": "A."}]},
        {"sample_id": "order", "messages": [user, user]},
        {"sample_id": "first", "messages": [bot, user]},
        {"sample_id": "late-system", "messages": [user, bot, {"role": "system", "content": "S."}]},
        {"sample_id": "empty", "messages": [user, {"role": "assistant", "content": " "}]},
        {"sample_id": "shape", "messages": "not a list"},
        {"sample_id": "no-turns", "messages": []},
    ]
    result = ingest(str(_write_jsonl(tmp_path / "c.jsonl", good + [sharegpt, open_end] + bad)), tmp_path / "s",
                    progress=False)  # fmt: skip
    samples = {r["sample_id"]: r for r in result.samples.to_pylist()}
    assert set(samples) == {"chat-0", "chat-1", "sg", "open"}
    chat = samples["chat-0"]
    turns = json.loads(chat["messages"])
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user", "assistant"]
    assert chat["prompt"] == turns[3]["content"] and chat["response"] == turns[4]["content"]  # the last exchange
    assert samples["sg"]["messages"] == "" and samples["sg"]["prompt"] == "Q?"  # one exchange: a plain sample
    assert samples["open"]["response"] == ""  # ends with the user: the teacher writes the answer
    fields = {r["sample_id"]: (r["field"], r["reason"]) for r in result.rejects.to_pylist()}
    assert fields["role"][0] == "messages[1].role" and "got 'bot'" in fields["role"][1]
    assert fields["order"][0] == "messages[1].role" and "expected assistant" in fields["order"][1]
    assert fields["first"][0] == "messages[0].role" and fields["late-system"][0] == "messages[2].role"
    assert fields["empty"] == ("messages[1].content", "empty")
    assert fields["shape"][0] == fields["no-turns"][0] == "messages"
    assert len(fields) == len(bad)  # nothing dropped silently

    # Open-Orca's columns: system_prompt, question, response (an empty system prompt: a plain sample)
    orca = pa.table({"id": ["o1", "o2"], "system_prompt": ["You are a helpful assistant.", ""],
                     "question": ["Why is the sky blue?", "Name a colour."], "response": ["Scattering.", "Red."]})  # fmt: skip
    pq.write_table(orca, tmp_path / "orca.parquet")
    done = run(["-m", "pipeline.samples", "--source", str(tmp_path / "orca.parquet"), "--out", str(tmp_path / "o"),
                "--prompt-field", "question", "--id-field", "id"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {r["sample_id"]: r for r in load_samples(tmp_path / "o").to_pylist()}
    assert json.loads(rows["o1"]["messages"]) == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Scattering."}]  # fmt: skip
    assert rows["o2"]["messages"] == "" and rows["o2"]["prompt"] == "Name a colour."
    assert "system_prompt" not in json.loads(rows["o1"]["meta"])  # a mapped column, not metadata

    # a samples file of version 1 (before conversations) still reads: every sample plain
    v1 = result.samples.drop_columns(["messages"])
    v1 = v1.replace_schema_metadata({**v1.schema.metadata, b"speechkd.version": b"1"})
    pq.write_table(v1, tmp_path / "v1.parquet")
    old = load_samples(tmp_path / "v1.parquet")
    assert old["messages"].to_pylist() == [""] * old.num_rows
    # a samples file is a source too: its plain samples stay plain
    again = ingest(str(tmp_path / "s" / "samples.parquet"), tmp_path / "s2", FieldMap(), progress=False)
    assert again.samples["messages"].to_pylist() == result.samples["messages"].to_pylist()


def test_the_template_cut_scores_the_last_or_every_assistant_turn(chat_samples, tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    sample = load_samples(chat_samples).to_pylist()[0]
    turns = conversation(sample)
    whole = tok.apply_chat_template(turns, tokenize=False)
    for which, scored in (("last", [4]), ("all", [2, 4])):
        pieces = segments(tok, turns, which)
        assert "".join(p.text for p in pieces) == whole[: len("".join(p.text for p in pieces))]
        assert [p.turn for p in pieces if p.kind == "response"] == scored
        enc = encode_conversation(tok, turns, which)
        assert len(enc.spans) == len(scored)
        for (start, n), t in zip(enc.spans, scored):
            assert tok.decode(enc.input_ids[start : start + n]) == turns[t]["content"] + tok.eos_token
            # the span starts where the template's rendering of the turns before it ends
            before = tok.apply_chat_template(turns[:t], tokenize=False, add_generation_prompt=True)
            assert tok.decode(enc.input_ids[:start]) == before
    # spoken user turns are slots in their place; the system prompt and the assistant turns stay text
    pieces = segments(tok, turns, "all", spoken=[1, 3])
    assert [p.turn for p in pieces if p.kind == "speech"] == [1, 3]
    assert SYSTEM_PROMPT in pieces[0].text and all(turns[t]["content"] not in "".join(p.text or "" for p in pieces)
                                                   for t in (1, 3))  # fmt: skip
    # teacher-written responses: the dataset's last answer is dropped and the teacher writes it
    enc = encode_conversation(tok, to_score(turns, "teacher"), "all")
    assert enc.open_end and enc.spans[-1] == (len(enc.input_ids), 0) and len(enc.spans) == 2


class RecordingEspeak(EspeakNG):
    """espeak-ng itself, recording the texts it is handed."""

    def __init__(self):
        super().__init__()
        self.texts = []

    def synthesize(self, text, voice, rate_wpm):
        self.texts.append(text)
        return super().synthesize(text, voice, rate_wpm)


def test_the_speech_stage_speaks_the_user_turns_and_never_the_system_prompt(chat_samples, tmp_path):
    from pipeline.features import FeatureConfig, FeatureStore, extract_all
    from student.inputs import SpeechIndex

    samples = load_samples(chat_samples).to_pylist()[:3]
    users = {s["sample_id"]: [(i, m["content"]) for i, m in enumerate(conversation(s)) if m["role"] == "user"]
             for s in samples}  # fmt: skip
    last, every = RecordingEspeak(), RecordingEspeak()
    sub = tmp_path / "samples"
    sub.mkdir()
    pq.write_table(load_samples(chat_samples).slice(0, 3), sub / "samples.parquet")
    one = synthesize_all(sub, tmp_path / "last", last, voices=("en-us",), rates=(170,), progress=False)
    both = synthesize_all(sub, tmp_path / "all", every, voices=("en-us",), rates=(170,), progress=False,
                          speak="all-user")  # fmt: skip
    assert sorted(last.texts) == sorted(u[-1][1] for u in users.values())
    assert sorted(every.texts) == sorted(text for u in users.values() for _, text in u)
    assert not any(SYSTEM_PROMPT in t for t in last.texts + every.texts)
    assert {(r["sample_id"], r["turn"]) for r in one.index.to_pylist()} == {(s, u[-1][0]) for s, u in users.items()}
    rows = both.index.to_pylist()
    assert {(r["sample_id"], r["turn"]) for r in rows} == {(s, i) for s, u in users.items() for i, _ in u}
    assert len({r["path"] for r in rows}) == len(rows)  # one file per spoken turn
    assert pq.read_schema(tmp_path / "all" / "index.parquet").metadata[b"speechkd.speak"] == b"all-user"
    # features keep the turn; the student's join groups a rendition's turns into one example
    extract_all(tmp_path / "all" / "index.parquet", tmp_path / "features", FeatureConfig(n_mels=40), progress=False)
    index = SpeechIndex(FeatureStore(tmp_path / "features"))
    for sid, u in users.items():
        (group,) = index.clips(sid)
        assert [t for t, _ in group] == [i for i, _ in u]


# --- the cache: --turns and one-pass responses (a vLLM engine) -------------------------------------------------


def _rows(cache):
    reader = CacheReader(cache)
    return {r["sample_id"]: reader.decode_row(r) for r in reader.iter_rows()}


def test_turns_all_caches_every_assistant_turn_in_its_span(chat_samples, tiny_teacher, vllm_engine, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.query import connect
    from pipeline.teacher import cache_teacher_logits

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    samples = {s["sample_id"]: s for s in load_samples(chat_samples).to_pylist()}
    cached = {}
    for which in ("last", "all"):
        out = tmp_path / which / "cache"
        s = cache_teacher_logits(tiny_teacher_config(tiny_teacher, samples=chat_samples, out=out, top_k=8,
                                                     turns=which), False, vllm_engine)  # fmt: skip
        assert s["cached_now"] == len(samples) and s["rejected"] == 0
        cached[which] = _rows(out)
        assert CacheReader(out).fingerprint["turns"] == which
    for sid, sample in samples.items():
        turns = conversation(sample)
        for which, scored in (("last", [4]), ("all", [2, 4])):
            row, enc = cached[which][sid], encode_conversation(tok, turns, which)
            assert row["turn_starts"].tolist() == [a for a, _ in enc.spans]
            assert row["turn_lengths"].tolist() == [n for _, n in enc.spans]
            parts = np.split(row["token_ids"], np.cumsum(row["turn_lengths"])[:-1])
            assert [tok.decode(p) for p in parts] == [turns[t]["content"] + tok.eos_token for t in scored]
        # the last turn's targets are the same whichever turns are cached
        n = cached["last"][sid]["turn_lengths"][0]
        np.testing.assert_array_equal(cached["all"][sid]["topk_ids"][-n:], cached["last"][sid]["topk_ids"])
    con = connect(tmp_path / "all", tmp_path / "all" / "cache")
    assert con.sql("SELECT count(*), count(DISTINCT sample_id) FROM teacher_turns").fetchall() == [(16, 8)]


def test_one_pass_responses_are_the_greedy_generation_with_the_rescored_top_k(samples_dir, tiny_teacher,
                                                                              vllm_engine, tmp_path):  # fmt: skip
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.teacher import cache_teacher_logits

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    cfg = dict(samples=samples_dir, top_k=8, limit=8, max_new_tokens=24, temperature=0.0)
    one = cache_teacher_logits(tiny_teacher_config(tiny_teacher, out=tmp_path / "one", responses="teacher", **cfg),
                               False, vllm_engine)  # fmt: skip
    two = cache_teacher_logits(tiny_teacher_config(tiny_teacher, out=tmp_path / "two", responses="teacher-rescored",
                                                   **cfg), False, vllm_engine)  # fmt: skip
    assert one["cached_now"] == two["cached_now"] == 8 and one["tokens_generated"] == two["tokens_generated"] > 0
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    samples = {s["sample_id"]: s for s in load_samples(samples_dir).to_pylist()[:8]}
    prompts = [encode_conversation(tok, to_score(conversation(samples[sid]), "teacher")).input_ids for sid in a]
    greedy = vllm_engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                  SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)  # fmt: skip
    step = CacheReader(tmp_path / "one").encoding.max_error
    for sid, g, p in zip(a, greedy, prompts):
        x, y = a[sid], b[sid]
        assert x["token_ids"].tolist() == list(g.outputs[0].token_ids)  # the ids the teacher produced, eos included
        assert x["token_ids"].tolist() == y["token_ids"].tolist() and x["turn_starts"].tolist() == [len(p)]
        np.testing.assert_allclose(x["token_logprobs"], y["token_logprobs"], atol=1e-4)
        # the same top-k: as sets of (id, logprob) per position, within the encoding's error
        for t in range(len(x["token_ids"])):
            got, want = dict(zip(x["topk_ids"][t], x["topk_logprobs"][t])), dict(zip(y["topk_ids"][t],
                                                                                   y["topk_logprobs"][t]))  # fmt: skip
            shared = set(got) & set(want)
            assert len(shared) >= 7  # a tie at the k-th place may swap one id
            assert max(abs(got[i] - want[i]) for i in shared) <= step + 1e-4
        assert x["response"] == tok.decode(x["token_ids"], skip_special_tokens=True).strip()
    # the fingerprint says how: one pass or two, and the generation settings; the two never mix in one cache
    fa, fb = CacheReader(tmp_path / "one").fingerprint, CacheReader(tmp_path / "two").fingerprint
    assert (fa["responses"], fb["responses"]) == ("teacher", "teacher-rescored")
    assert fa["generation"] == fb["generation"] == {"temperature": 0.0, "max_new_tokens": 24, "seed": None}
    with pytest.raises(FingerprintMismatch, match="responses"):
        cache_teacher_logits(tiny_teacher_config(tiny_teacher, out=tmp_path / "one", responses="teacher-rescored",
                                                 **cfg), False, vllm_engine)  # fmt: skip


def test_written_responses_resume_without_writing_a_cached_sample_again(samples_dir, tiny_teacher, vllm_engine,
                                                                        tmp_path):  # fmt: skip
    from pipeline.teacher import cache_teacher_logits

    cfg = dict(samples=samples_dir, out=tmp_path / "cache", top_k=8, responses="teacher", max_new_tokens=16)
    first = cache_teacher_logits(tiny_teacher_config(tiny_teacher, limit=4, **cfg), False, vllm_engine)
    kept = _rows(tmp_path / "cache")
    second = cache_teacher_logits(tiny_teacher_config(tiny_teacher, limit=10, **cfg), False, vllm_engine)
    rows = _rows(tmp_path / "cache")
    assert (first["cached_now"], second["already_cached"], second["cached_now"]) == (4, 4, 6)
    new = set(rows) - set(kept)
    # only the new samples were written: the generated tokens are theirs
    assert second["tokens_generated"] == sum(len(rows[sid]["token_ids"]) for sid in new)
    assert all(rows[sid]["token_ids"].tolist() == kept[sid]["token_ids"].tolist() for sid in kept)
    assert len(CacheReader(tmp_path / "cache").sample_ids()) == 10  # one row each
    third = cache_teacher_logits(tiny_teacher_config(tiny_teacher, limit=10, **cfg), False, vllm_engine)
    assert third["cached_now"] == 0 and third["tokens_generated"] == 0


def test_sampled_targets_with_teacher_responses_are_generated_then_rescored(tiny_teacher):
    cfg = tiny_teacher_config(tiny_teacher, responses="teacher", targets="sampled")
    assert cfg.responses_mode == "teacher-rescored"
    assert tiny_teacher_config(tiny_teacher, responses="teacher").responses_mode == "teacher"
