"""Held-out listening conditions: seeded per clip, at the asked SNR, the telephone band, a room's tail."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.conditions import CONDITIONS, SAMPLE_RATE, apply, pink_noise, rng_for


def _speechlike(seed: int = 0, seconds: float = 1.5) -> np.ndarray:
    """A voiced stand-in: harmonics of 140 Hz up to 6 kHz under a syllable-rate envelope, then exact silence (as
    espeak-ng writes it)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = sum(np.sin(2 * np.pi * 140 * h * t) / h for h in range(1, 43))
    wave *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    out = np.concatenate([0.3 * wave / np.abs(wave).max(), np.zeros(SAMPLE_RATE // 4)]).astype(np.float32)
    return out


def _band_energy(wave: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(wave)) ** 2
    f = np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)
    return float(spec[(f >= lo) & (f < hi)].sum())


@pytest.mark.parametrize("condition", CONDITIONS)
def test_each_condition_is_seeded_by_the_clip_and_keeps_its_length(condition):
    wave = _speechlike()
    a, b = apply(condition, wave, key="s1"), apply(condition, wave, key="s1")
    assert a.dtype == np.float32 and len(a) == len(wave) and np.array_equal(a, b)
    assert np.abs(a).max() < 1.0 and not np.allclose(a, wave, atol=1e-3)
    if condition != "telephone":  # the noise and the room are drawn per clip; the line is the same for all
        assert not np.array_equal(a, apply(condition, wave, key="s2"))


def test_noise_is_added_at_the_asked_snr_and_is_pink():
    wave = _speechlike()
    for snr in (20, 10):
        noisy = apply(f"noise-{snr}db", wave, key="x")
        noise = noisy - wave
        measured = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
        assert measured == pytest.approx(snr, abs=0.05)
    n = pink_noise(1 << 16, rng_for("noise", "k"))
    assert _band_energy(n, 100, 200) > 8 * _band_energy(n, 3200, 3300)  # 1/f: ~32x at these bands, white: 1x


def test_the_telephone_line_cuts_what_a_phone_does_not_carry():
    wave = _speechlike()
    line = apply("telephone", wave, key="x")
    # above the 8 kHz line's Nyquist: at least 20 dB down just past it (the resampler's roll-off), 30 dB from 5 kHz
    assert _band_energy(line, 4200, 8000) < 1e-2 * _band_energy(wave, 4200, 8000)
    assert _band_energy(line, 5000, 8000) < 1e-3 * _band_energy(wave, 5000, 8000)
    assert _band_energy(line, 0, 150) < 0.1 * _band_energy(wave, 0, 150)
    assert _band_energy(line, 500, 3000) > 0.3 * _band_energy(wave, 500, 3000)


def test_the_room_fills_the_silence_after_speech():
    wave = _speechlike()
    wet = apply("reverb", wave, key="x")
    tail = slice(len(wave) - SAMPLE_RATE // 4, len(wave) - SAMPLE_RATE // 4 + 1600)  # 100 ms after the speech ends
    assert np.all(wave[tail] == 0) and np.sqrt(np.mean(wet[tail] ** 2)) > 1e-3


def test_training_perturbations_are_none_of_the_held_out_conditions():
    """pipeline.augment (training) and pipeline.conditions (held out) must not share a condition: augment's noise is
    white (as much power above 4 kHz as below; the held-out noise is pink, far less), its rooms come from its own
    generator (never a conditions impulse response), and it never band-limits (the telephone line is held out)."""
    import numpy as np

    from pipeline import augment, conditions

    def high_over_low(x):
        p = np.abs(np.fft.rfft(x)) ** 2
        half = len(p) // 2
        return p[half:].sum() / p[:half].sum()

    rng = np.random.default_rng(0)
    tone = (0.3 * np.sin(np.arange(32000) * 0.05)).astype(np.float32)
    white = augment.perturb(tone, augment.Perturbation(snr_db=0.0), rng) - tone
    pink = conditions.pink_noise(32000, rng)
    assert augment.NOISE_TYPE == "white" and 0.8 < high_over_low(white) < 1.25 and high_over_low(pink) < 0.1
    for seed in range(5):
        ir = augment.room_response(0.4, np.random.default_rng(seed))
        held = conditions.room_response(conditions.rng_for("reverb", f"k{seed}"))
        assert len(ir) == len(held) and not np.allclose(ir, held)
    clean = augment.perturb(tone, augment.Perturbation(dither_db=60.0), rng)
    assert high_over_low(clean - tone) > 0.8  # the dither is white too: nothing above 4 kHz is taken away
