import hashlib

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile as sf

from pipeline.parquet_io import rejects_path
from pipeline.speech import (
    DEFAULT_VOICES,
    SAMPLE_RATE,
    EspeakNG,
    Rendition,
    SynthesisError,
    audio_relpath,
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
    the speech has fewer voices than it claims; and the flow's held-out voice is none of them."""
    from flows.cache_teacher import HELDOUT_VOICE

    voices = sorted(set(voice_grid()) | set(DEFAULT_VOICES))
    assert len(voice_grid()) == len(set(voice_grid())) == 98 and HELDOUT_VOICE not in voices
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
