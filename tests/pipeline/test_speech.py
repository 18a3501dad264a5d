import hashlib
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.errors import UserError
from pipeline.parquet_io import rejects_path
from pipeline.samples import ingest
from pipeline.schemas import read_metadata
from pipeline.speech import (
    DEFAULT_VOICES,
    SAMPLE_RATE,
    EspeakNG,
    Rendition,
    SynthesisError,
    TrainPerturbation,
    audio_relpath,
    describe_perturbation,
    renditions_for,
    synthesize_all,
    voice_grid,
)


def test_espeak_produces_decodable_16k_audio(samples_dir, tmp_path):
    out = tmp_path / "audio"
    result = synthesize_all(samples_dir, out, voices=("en-us", "en-gb"), rates=(150, 180), per_sample=2,
                            progress=False)  # fmt: skip
    n_samples = pq.read_table(samples_dir / "samples.parquet").num_rows
    assert result.index.num_rows == 2 * n_samples and result.rejects.num_rows == 0
    rows = result.index.to_pylist()
    # two distinct renditions per sample
    per_sample = {}
    for r in rows:
        per_sample.setdefault(r["sample_id"], set()).add(r["rendition"])
    assert all(len(v) == 2 for v in per_sample.values())
    for r in rows[:5]:
        wave, sr = sf.read(out / r["path"], dtype="float32")
        assert sr == SAMPLE_RATE and wave.ndim == 1
        assert abs(len(wave) / sr - r["duration_s"]) < 1e-3
        assert 0.3 < r["duration_s"] < 10  # a spoken question, not silence or garbage
        assert np.abs(wave).max() > 0.01


def test_every_voice_of_the_grid_is_its_own_voice():
    """espeak-ng takes a variant it cannot apply silently (`en-gb+f2` is `en-gb`): every voice of the grid (the
    encoder's pretraining voices) and of the default training speech must sound different from every other, or
    the speech has fewer voices than it claims; and the held-out voice (the flow's, the toy encoder's) is none of
    them."""
    from toy.encoder import EncoderBuildConfig

    voices = sorted(set(voice_grid()) | set(DEFAULT_VOICES))
    assert EspeakNG.heldout_voice == EncoderBuildConfig.heldout_voice
    assert len(voice_grid()) == len(set(voice_grid())) == 98 and EspeakNG.heldout_voice not in voices
    tts = EspeakNG()
    sounds = {}
    for voice in voices:
        wave, _ = tts.synthesize("Which city is the capital?", voice, 160)
        sounds.setdefault(hashlib.sha256(wave.tobytes()).hexdigest(), []).append(voice)
    same = [v for v in sounds.values() if len(v) > 1]
    assert not same, f"voices that sound the same: {same}"


def test_flite_speaks_in_its_own_voices_and_refuses_one_it_lacks(samples_dir, tmp_path):
    """The second synthesizer: every eval prompt spoken in flite's default voices, as 16 kHz audio, at the rate
    asked for; an unknown voice (which flite itself would speak in its default voice, silently) is refused
    before anything is written."""
    import pytest

    from pipeline.errors import UserError
    from pipeline.speech import Flite

    tts = Flite()
    result = synthesize_all(samples_dir, tmp_path / "audio", backend=tts, rates=(150,), split="eval",
                            progress=False)  # fmt: skip
    n_eval = pq.read_table(samples_dir / "samples.parquet").filter(pc.field("split") == "eval").num_rows
    assert result.index.num_rows == n_eval > 0 and result.rejects.num_rows == 0
    assert set(result.index["voice"].to_pylist()) <= set(Flite.default_voices)
    row = result.index.to_pylist()[0]
    wave, sr = sf.read(tmp_path / "audio" / row["path"], dtype="float32")
    assert sr == SAMPLE_RATE and 0.3 < len(wave) / sr < 10 and np.abs(wave).max() > 0.01
    slow, _ = tts.synthesize("Which city is the capital?", "slt", 120)
    fast, _ = tts.synthesize("Which city is the capital?", "slt", 240)
    assert 1.5 < len(slow) / len(fast) < 2.5
    with pytest.raises(UserError, match="flite has no voice.*en-us"):
        synthesize_all(samples_dir, tmp_path / "other", backend=tts, voices=("slt", "en-us"), progress=False)
    assert not (tmp_path / "other").exists()


def test_no_voices_is_refused_not_replaced_by_the_defaults(samples_dir, tmp_path):
    from pipeline.errors import UserError

    for voices, rates in (((), (170,)), (("en-us",), ())):
        try:
            synthesize_all(samples_dir, tmp_path / "audio", voices=voices, rates=rates, progress=False)
        except UserError as exc:
            assert "no renditions" in str(exc)
        else:
            raise AssertionError(f"voices {voices}, rates {rates}: not refused")
    assert not (tmp_path / "audio").exists()


def test_rerun_skips_existing_audio(samples_dir, tmp_path):
    out = tmp_path / "audio"
    first = synthesize_all(samples_dir, out, voices=("en-us",), rates=(170,), progress=False)
    path = out / first.index["path"][0].as_py()
    mtime = path.stat().st_mtime_ns
    second = synthesize_all(samples_dir, out, voices=("en-us",), rates=(170,), progress=False)
    assert second.synthesized == 0 and second.skipped == first.index.num_rows
    assert path.stat().st_mtime_ns == mtime
    assert second.index.to_pylist() == first.index.to_pylist()


def test_perturbed_training_speech_is_seeded_train_only_and_recorded(tiny_rows, tmp_path):
    """--perturb-train: the same samples and seed give the same audio in another directory (so in any order or
    process); a clip of the eval split is never perturbed; the index records each draw, the file name its digest."""
    rows = [r for r in tiny_rows if r["split"] == "train"][:40] + [r for r in tiny_rows if r["split"] == "eval"][:20]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples_dir = tmp_path / "samples"
    ingest(str(tmp_path / "rows.jsonl"), samples_dir, progress=False)
    kw = dict(voices=("en-us",), rates=(170,), progress=False, perturb=TrainPerturbation(0.5, seed=3))
    first = synthesize_all(samples_dir, tmp_path / "a", **kw).index
    again = synthesize_all(samples_dir, tmp_path / "b", jobs=1, **kw).index
    clean = synthesize_all(samples_dir, tmp_path / "c", voices=("en-us",), rates=(170,), progress=False).index
    assert read_metadata(pq.read_schema(tmp_path / "a" / "index.parquet"))["version"] == "3"
    assert again.to_pylist() == first.to_pylist()  # the same clips, files and draws with one thread
    table = pq.read_table(samples_dir / "samples.parquet", columns=["sample_id", "split"])
    split = dict(zip(table["sample_id"].to_pylist(), table["split"].to_pylist()))
    rows, clean_rows = first.to_pylist(), {r["sample_id"]: r for r in clean.to_pylist()}
    perturbed = [r for r in rows if r["perturbation"] is not None]
    n_train = sum(split[r["sample_id"]] == "train" for r in rows)
    assert 0.25 * n_train < len(perturbed) < 0.75 * n_train
    assert all(split[r["sample_id"]] == "train" for r in perturbed)  # eval: never
    assert clean["perturbation"].null_count == clean.num_rows
    for r in rows:
        wave = sf.read(tmp_path / "a" / r["path"], dtype="float32")[0]
        assert np.array_equal(wave, sf.read(tmp_path / "b" / r["path"], dtype="float32")[0])  # seeded
        base = sf.read(tmp_path / "c" / clean_rows[r["sample_id"]]["path"], dtype="float32")[0]
        if r["perturbation"] is None:
            assert r["path"] == clean_rows[r["sample_id"]]["path"] and np.array_equal(wave, base)
        else:
            assert ".p" in r["path"] and r["path"] != clean_rows[r["sample_id"]]["path"]
            speed = json.loads(r["perturbation"])["speed"]
            assert json.loads(r["perturbation"])["vtln_warp"] == 1.0  # a feature-side warp is not in the audio
            assert abs(len(wave) - len(base) / speed) <= 0.01 * len(base) + 2  # played `speed` times as fast
            assert len(wave) != len(base) or not np.array_equal(wave, base)
    other_seed = TrainPerturbation(0.5, seed=4)
    draws = [other_seed.draw(r["sample_id"], split[r["sample_id"]], Rendition("en-us", 170), r["turn"]) for r in rows]
    assert [describe_perturbation(d) for d in draws] != first["perturbation"].to_pylist()
    with pytest.raises(UserError, match="--perturb-train"):
        TrainPerturbation(1.5)


class FlakyBackend:
    """Real espeak-ng, except for prompts mentioning 'plus', which fail."""

    name = "flaky"

    def __init__(self):
        self.real = EspeakNG()

    def synthesize(self, text, voice, rate_wpm):
        if "plus" in text:
            raise SynthesisError("backend refused this text")
        return self.real.synthesize(text, voice, rate_wpm)


def test_failed_synthesis_is_recorded_and_the_rest_go_on(samples_dir, tmp_path):
    out = tmp_path / "audio"
    result = synthesize_all(samples_dir, out, backend=FlakyBackend(), voices=("en-us",), rates=(170,),
                            progress=False)  # fmt: skip
    prompts = dict(
        zip(*pq.read_table(samples_dir / "samples.parquet", columns=["sample_id", "prompt"]).to_pydict().values())
    )
    failing = {sid for sid, p in prompts.items() if "plus" in p}
    assert failing and result.rejects.num_rows == len(failing)
    rejects = pq.read_table(rejects_path(out, "speech")).to_pylist()
    assert {r["sample_id"] for r in rejects} == failing
    assert all(r["field"] == "prompt" and "refused" in r["reason"] and r["rendition"] == "en-us@170" for r in rejects)
    assert set(result.index["sample_id"].to_pylist()) == set(prompts) - failing


def test_renditions_are_deterministic_and_distinct():
    grid = [Rendition(v, r) for v in ("a", "b", "c") for r in (100, 200)]
    assert renditions_for("s1", grid, 3) == renditions_for("s1", grid, 3)
    assert len(set(renditions_for("s1", grid, 3))) == 3
    assert len(renditions_for("s1", grid, 99)) == len(grid)
    assert audio_relpath("a/b c", grid[0]) != audio_relpath("a_b_c", grid[0])
    assert "/" not in audio_relpath("a/b", grid[0]).rsplit("/", 1)[1]


def test_vits_speaks_every_prompt_in_batches_trimmed_to_each_clip(samples_dir, tiny_vits, tmp_path):
    """--backend vits: transformers' VitsModel behind the speech stage, batched by rendition. Each clip is cut to
    its own length out of the padded batch (the tiny model speaks 512 samples a token at 22.05 kHz, so that length
    is known), resampled to 16 kHz; a batch gives what clip-by-clip synthesis gives; the same data gives the
    same audio; speakers differ; a rate shortens or lengthens the clip as asked."""
    from pipeline.speech import Vits

    tts = Vits(str(tiny_vits), device="cpu", batch_size=4)
    assert tts.voices == ("spk0", "spk1", "spk2", "spk3") and tts.heldout_voice == "spk3"
    assert tts.default_voices == ("spk0", "spk1", "spk2")
    out = tmp_path / "audio"
    result = synthesize_all(samples_dir, out, backend=tts, rates=(175,), split="eval", progress=False)
    n_eval = pq.read_table(samples_dir / "samples.parquet").filter(pc.field("split") == "eval").num_rows
    assert result.index.num_rows == result.synthesized == n_eval > 4 and result.rejects.num_rows == 0
    assert set(result.index["voice"].to_pylist()) <= set(tts.default_voices)
    assert read_metadata(pq.read_schema(out / "index.parquet"))["tts_backend"] == f"vits:{tiny_vits}"
    prompts = dict(zip(*pq.read_table(samples_dir / "samples.parquet", columns=["sample_id", "prompt"])
                       .to_pydict().values()))  # fmt: skip
    lengths = set()
    for row in result.index.to_pylist():
        wave, sr = sf.read(out / row["path"], dtype="float32")
        tokens = len(tts.tokenizer(prompts[row["sample_id"]]).input_ids)
        assert sr == SAMPLE_RATE and abs(len(wave) - tokens * 512 * SAMPLE_RATE / 22050) <= 2
        assert np.abs(wave).max() > 0.01
        lengths.add(len(wave))
    assert len(lengths) > 1  # prompts of several lengths went through padded batches

    texts = [prompts[s] for s in list(prompts)[:4]]
    assert len({len(t) for t in texts}) > 1
    batched = tts.synthesize_batch(texts, "spk1", 175)
    again = tts.synthesize_batch(texts, "spk1", 175)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(batched, again))  # seeded: the same audio
    tts.model.noise_scale = 0.0  # without the prior's noise, a batch must equal its clips one by one ...
    quiet = tts.synthesize_batch(texts, "spk1", 175)
    longest = max(range(4), key=lambda i: len(quiet[i][0]))
    for i, (text, (wave, sr)) in enumerate(zip(texts, quiet)):
        alone, _ = tts.synthesize(text, "spk1", 175)
        assert sr == 22050 and wave.shape == alone.shape
        tail = 0 if i == longest else 512  # ... but where the decoder's convolutions reach into the padding
        assert np.allclose(wave[: len(wave) - tail], alone[: len(alone) - tail], atol=1e-4)
    other, _ = tts.synthesize(texts[0], "spk2", 175)
    assert other.shape == quiet[0][0].shape and not np.allclose(other, quiet[0][0], atol=1e-3)
    fast, _ = tts.synthesize(texts[0], "spk1", 350)  # 1 frame a token instead of 2
    slow, _ = tts.synthesize(texts[0], "spk1", 88)  # ceil(2 x 175/88) = 4
    assert 2 * len(fast) == len(quiet[0][0]) and len(slow) == 2 * len(quiet[0][0])


def test_vits_rejects_only_the_unspeakable_clip_of_a_batch_and_refuses_bad_options(tiny_vits, tmp_path, capsys):
    import json

    import pytest

    from pipeline.errors import UserError
    from pipeline.samples import ingest
    from pipeline.speech import Vits, main

    src = tmp_path / "three.jsonl"
    rows = [{"sample_id": f"s{i}", "prompt": p, "response": "ok"} for i, p in
            enumerate(["What is the capital of Norway?", "...?", "Who wrote it?"])]  # fmt: skip
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(str(src), tmp_path / "samples", progress=False)
    tts = Vits(str(tiny_vits), device="cpu", batch_size=8)
    result = synthesize_all(tmp_path / "samples", tmp_path / "audio", backend=tts, voices=("spk0",), rates=(175,),
                            progress=False)  # fmt: skip
    assert result.index["sample_id"].to_pylist() == ["s0", "s2"] and result.synthesized == 2
    reject = pq.read_table(rejects_path(tmp_path / "audio", "speech")).to_pylist()
    assert [r["sample_id"] for r in reject] == ["s1"] and "nothing speakable" in reject[0]["reason"]

    with pytest.raises(UserError, match="has no voice.*spk7"):
        synthesize_all(tmp_path / "samples", tmp_path / "other", backend=tts, voices=("spk0", "spk7"), progress=False)
    assert not (tmp_path / "other").exists()
    capsys.readouterr()
    code = main(["--backend", "vits", "--tts-model", str(tmp_path / "no-such-model"), "--samples",
                 str(tmp_path / "samples"), "--out", str(tmp_path / "other")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a loadable VITS model" in err[0], err
    assert main(["--backend", "espeak-ng", "--tts-model", str(tiny_vits)]) == 2
    assert main(["--backend", "vits", "--tts-model", str(tiny_vits), "--samples", str(tmp_path / "samples"),
                 "--out", str(tmp_path / "cli"), "--voices", "spk2", "--tts-device", "cpu"]) == 0  # fmt: skip
    assert "speech: 2 clips (2 synthesized" in capsys.readouterr().out


def test_vits_from_many_threads_speaks_each_text_not_another(tiny_vits):
    """synthesize_all calls a backend from --jobs threads; the phonemizing tokenizer drives libespeak-ng, which
    is not thread-safe (unlocked, 166 of 200 texts came out as another text's phonemes here)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.speech import Vits

    tts = Vits(str(tiny_vits), device="cpu", batch_size=1)
    texts = [f"Question {i}: which city is the capital of the country called Zorb{'a' * (i % 7)}t?" for i in range(40)]
    expected = [len(tts.tokenizer(t).input_ids) * 512 for t in texts]  # 512 samples a token at rate 1
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: len(tts.synthesize(t, "spk0", 175)[0]), texts))
    assert got == expected


KNOWN_TEXT = "What is the capital of Zorbania? The capital of Zorbania is Melvik."  # 12 words


@pytest.mark.parametrize("name", ["espeak-ng", "festival", "flite"])
def test_every_synthesizer_speaks_a_known_text_in_each_default_voice_at_its_rate(name):
    """Each synthesizer the encoder's corpus, the training speech or a held-out set uses: every default voice (and
    the held-out one) speaks 12 words in 2.5-7 s at 150 wpm (a silent, cut or looping clip fails), faster at 200."""
    from pipeline.speech import make_backend, to_16k

    tts = make_backend(name)
    voices = tts.default_voices + ((tts.heldout_voice,) if tts.heldout_voice else ())
    for voice in voices if name != "espeak-ng" else voices[::13]:  # espeak-ng: every accent is tested above
        wave = to_16k(*tts.synthesize(KNOWN_TEXT, voice, 150))
        seconds = len(wave) / SAMPLE_RATE
        assert 2.5 < seconds < 7.0 and np.abs(wave).max() > 0.05, (voice, seconds)
        faster = len(to_16k(*tts.synthesize(KNOWN_TEXT, voice, 200))) / SAMPLE_RATE
        assert faster < seconds * 0.9, (voice, seconds, faster)


def test_festival_batches_escape_their_text_and_a_mix_speaks_each_synthesizer_in_equal_shares(samples_dir, tmp_path):
    """A Festival batch (one process for many clips) gives each text its own clip, quotes and backslashes
    included; `espeak-ng+festival` speaks each clip with one of them, half the clips each, and names the voices of
    the second by their synthesizer."""
    from collections import Counter

    from pipeline.speech import Festival, Mixed, make_backend

    tts = Festival()
    texts = ["Say \"yes\" to it.", "A back\\slash, then more words after it.", "One."]
    waves = tts.synthesize_batch(texts, "ked_diphone", 175)
    singles = [tts.synthesize(t, "ked_diphone", 175) for t in texts]
    assert [len(w) for w, _ in waves] == [len(w) for w, _ in singles] and len({len(w) for w, _ in waves}) == 3
    mix = make_backend("espeak-ng+festival")
    assert isinstance(mix, Mixed) and mix.heldout_voice == "en-029"
    assert "festival:ked_diphone" in mix.default_voices and "en-us" in mix.default_voices
    result = synthesize_all(samples_dir, tmp_path / "audio", backend=mix, progress=False)
    shares = Counter("festival" if v.startswith("festival:") else "espeak-ng" for v in result.index["voice"].to_pylist())
    assert result.rejects.num_rows == 0 and abs(shares["festival"] - shares["espeak-ng"]) <= 0.2 * result.index.num_rows
    assert read_metadata(pq.read_schema(tmp_path / "audio" / "index.parquet"))["tts_backend"] == "espeak-ng+festival"


def test_a_missing_synthesizer_or_voice_is_one_set_up_line_naming_its_package(monkeypatch):
    from pipeline.errors import UserError
    from pipeline.speech import Festival, Flite, families_of

    for cls, package in ((EspeakNG, "espeak-ng"), (Flite, "flite"), (Festival, "festival")):
        with pytest.raises(UserError, match=rf"^'no-such-program' \({package}\) not found on PATH: install it "
                                            rf"\(Debian/Ubuntu: `apt-get install -y {package}`"):
            cls(executable="no-such-program")
    # a voice Festival lacks (its package not installed): named with its package, not a silent drop of its clips
    monkeypatch.setitem(Festival.VOICE_PACKAGES, "cmu_us_awb_cg", "festvox-awb-cg")
    with pytest.raises(UserError, match=r"^festival has no voice 'cmu_us_awb_cg' \(festvox-awb-cg\): install it"):
        Festival(required=("ked_diphone", "cmu_us_awb_cg"))
    with pytest.raises(UserError, match="unknown text-to-speech backend 'espeak'"):
        families_of("espeak+festival")
    with pytest.raises(UserError, match="vits speaks alone"):
        families_of("vits+festival")


def test_a_mix_takes_its_first_synthesizers_voices_by_name_and_refuses_a_voice_none_has(samples_dir, tmp_path):
    """The flow's held-out voice of a mix is its first synthesizer's (en-029, not a default voice): spoken; a
    voice neither synthesizer has is refused before anything is written."""
    from pipeline.errors import UserError
    from pipeline.speech import make_backend

    mix = make_backend("espeak-ng+festival")
    result = synthesize_all(samples_dir, tmp_path / "held", backend=mix, voices=("en-029", "festival:kal_diphone"),
                            rates=(160,), split="eval", progress=False)  # fmt: skip
    assert result.rejects.num_rows == 0 and set(result.index["voice"].to_pylist()) == {"en-029",
                                                                                       "festival:kal_diphone"}
    with pytest.raises(UserError, match="has no voice\\(s\\) festival:nope, flite:slt"):
        synthesize_all(samples_dir, tmp_path / "bad", backend=mix, voices=("en-us", "festival:nope", "flite:slt"),
                       progress=False)  # fmt: skip
    assert not (tmp_path / "bad").exists()
