"""Listening conditions applied to a clip: the rooms, noise and lines a speech model's users speak through.

    noise-20db, noise-10db   pink (1/f) noise added at that signal-to-noise ratio (over the clip's mean power)
    reverb                   a synthetic small room: an exponentially decaying noise impulse response, RT60 0.4 s,
                             the direct path first, mixed to the clip's peak
    telephone                a G.711-like line: 300-3400 Hz band, 8 kHz sampling, 8-bit mu-law, back to 16 kHz

Each perturbation is seeded by (condition, clip key, seed): the same clip always hears the same noise and room, in
any order and in any process. Held-out conditions for evaluation (toy.world --export-benchmark writes the eval split
under each); none of them is used in training.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000
CONDITIONS = ("noise-20db", "noise-10db", "reverb", "telephone")


def rng_for(condition: str, key: str, seed: int = 0) -> np.random.Generator:
    digest = hashlib.sha256(f"{condition}\0{key}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """n samples of unit-power noise whose power falls as 1/f (white noise shaped in the frequency domain)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(f), n)
    return (noise / np.sqrt(np.mean(noise**2) + 1e-20)).astype(np.float32)


def add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    power = float(np.mean(wave.astype(np.float64) ** 2))
    noise = pink_noise(len(wave), rng) * np.sqrt(power / 10 ** (snr_db / 10))
    return (wave + noise).astype(np.float32)


def room_response(rng: np.random.Generator, rt60_s: float = 0.4, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """An impulse response: the direct path, then a diffuse tail decaying 60 dB over rt60_s."""
    n = int(rt60_s * sample_rate)
    t = np.arange(n) / sample_rate
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)  # ln(1000): 60 dB of amplitude over rt60
    tail[: int(0.005 * sample_rate)] = 0.0  # the first reflections arrive after ~5 ms
    ir = 0.3 * tail / np.sqrt(np.sum(tail**2))
    ir[0] = 1.0
    return ir.astype(np.float32)


def reverberate(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    wet = AF.fftconvolve(torch.from_numpy(wave), torch.from_numpy(room_response(rng)))[: len(wave)].numpy()
    peak = float(np.abs(wet).max()) or 1.0
    return (wet * (float(np.abs(wave).max()) / peak)).astype(np.float32)


def telephone(wave: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(wave)
    x = AF.highpass_biquad(x, SAMPLE_RATE, 300.0)
    x = AF.resample(x, SAMPLE_RATE, 8000)  # its anti-aliasing filter cuts at 4 kHz
    x = AF.lowpass_biquad(x, 8000, 3400.0)
    x = AF.mu_law_decoding(AF.mu_law_encoding(x.clamp(-1, 1), 256), 256)
    return AF.resample(x, 8000, SAMPLE_RATE)[: len(wave)].numpy().astype(np.float32)


def apply(condition: str, wave: np.ndarray, key: str, seed: int = 0) -> np.ndarray:
    """The clip (mono float32 at 16 kHz) under `condition`, seeded by the clip's key."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; known: {', '.join(CONDITIONS)}")
    rng = rng_for(condition, key, seed)
    if condition.startswith("noise-"):
        out = add_noise(wave, float(condition[len("noise-") : -len("db")]), rng)
    elif condition == "reverb":
        out = reverberate(wave, rng)
    else:
        out = telephone(wave)
    peak = float(np.abs(out).max())
    return out / peak * 0.999 if peak > 0.999 else out  # kept within full scale (a 16-bit file would clip it)
