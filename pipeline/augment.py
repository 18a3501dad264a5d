"""Training-side perturbations of a clip: other voices and other rooms than the synthesizers' clean output.

    speed        resampling by a factor (sox `speed`): pitch, formants and tempo move together
    vtln_warp    vocal-tract-length perturbation of the features (Kaldi fbank's VTLN warp of the mel filters):
                 formants move, pitch and tempo do not
    white noise  at a drawn SNR (white: a noise type none of the held-out conditions uses; they use pink)
    room         a reverberant room from this module's own impulse responses (sparse early reflections and a
                 band-limited decaying tail, RT60 drawn from a range), never pipeline.conditions' held-out rooms
    dither       always: a faint noise floor (-70 to -50 dB under the clip), so the silence a synthesizer writes as
                 exact zeros is never a cue

Never a band limit or a telephone line: pipeline.conditions keeps that (with pink noise and its own rooms) for
evaluation only. Every draw is seeded by (seed, clip key): the same corpus and seed give the same perturbed
clips, in any order and in any process.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000
NOISE_TYPE = "white"  # pipeline.conditions' held-out noise is pink: a test refuses them being the same


@dataclass(frozen=True)
class AugmentConfig:
    """How often and how far the clips of a training corpus are perturbed (0 probability: never)."""

    speed: tuple[float, float] = (0.85, 1.15)
    vtln: tuple[float, float] = (0.88, 1.12)
    noise_p: float = 0.4
    snr_db: tuple[float, float] = (5.0, 40.0)
    room_p: float = 0.3
    rt60_s: tuple[float, float] = (0.2, 0.8)
    dither_db: tuple[float, float] = (50.0, 70.0)

    def describe(self) -> dict:
        """What a build report lists as the conditions heard."""
        return {**asdict(self), "noise_type": NOISE_TYPE, "rooms": "augment.room_response (not conditions')"}


@dataclass(frozen=True)
class Perturbation:
    """One clip's draw."""

    speed: float = 1.0
    vtln_warp: float = 1.0
    snr_db: float | None = None
    rt60_s: float | None = None
    dither_db: float | None = None


CLEAN = Perturbation()


def rng_for(key: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"augment\0{key}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def draw(cfg: AugmentConfig, rng: np.random.Generator) -> Perturbation:
    return Perturbation(
        speed=round(float(rng.uniform(*cfg.speed)), 3),
        vtln_warp=round(float(rng.uniform(*cfg.vtln)), 3),
        snr_db=round(float(rng.uniform(*cfg.snr_db)), 1) if rng.random() < cfg.noise_p else None,
        rt60_s=round(float(rng.uniform(*cfg.rt60_s)), 2) if rng.random() < cfg.room_p else None,
        dither_db=round(float(rng.uniform(*cfg.dither_db)), 1),
    )


def change_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """The clip played `factor` times as fast (pitch and formants up by that factor too)."""
    if factor == 1.0:
        return wave
    new_rate = int(round(SAMPLE_RATE / factor / 50)) * 50  # a rate of whole 50 Hz: a short resampling kernel
    return AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), SAMPLE_RATE, new_rate).numpy()


def room_response(rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """A training room: the direct path, 3-8 sparse early reflections in the first 5-40 ms, and a tail decaying 60 dB
    over rt60_s whose high frequencies die sooner (a one-pole low-pass), mixed 0.2-0.6 under the direct path."""
    n = int(rt60_s * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)
    alpha = float(rng.uniform(0.3, 0.8))  # y[i] = x[i] + alpha y[i-1]
    tail = AF.lfilter(torch.from_numpy(tail), torch.tensor([1.0, -alpha], dtype=torch.float64),
                      torch.tensor([1.0, 0.0], dtype=torch.float64), clamp=False).numpy()  # fmt: skip
    tail[: int(0.005 * SAMPLE_RATE)] = 0.0
    ir = float(rng.uniform(0.2, 0.6)) * tail / np.sqrt(np.sum(tail**2))
    for _ in range(int(rng.integers(3, 9))):
        ir[int(rng.uniform(0.005, 0.04) * SAMPLE_RATE)] += float(rng.uniform(-0.5, 0.5))
    ir[0] = 1.0
    return ir.astype(np.float32)


def _noise_at(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    power = float(np.mean(wave.astype(np.float64) ** 2)) or 1e-10
    return (rng.standard_normal(len(wave)) * np.sqrt(power / 10 ** (snr_db / 10))).astype(np.float32)


def perturb(wave: np.ndarray, p: Perturbation, rng: np.random.Generator) -> np.ndarray:
    """The clip (mono float32, 16 kHz) under a perturbation; its vtln_warp is the features' (pipeline.features)."""
    out = change_speed(wave.astype(np.float32), p.speed)
    if p.rt60_s is not None:
        ir = room_response(p.rt60_s, rng)
        n = 1 << (len(out) + len(ir) - 2).bit_length()  # a power of two: an FFT size 10x faster than the exact one
        wet = np.fft.irfft(np.fft.rfft(out, n) * np.fft.rfft(ir, n), n)[: len(out)]
        out = wet * (float(np.abs(out).max()) / (float(np.abs(wet).max()) or 1.0))
    if p.snr_db is not None:
        out = out + _noise_at(out, p.snr_db, rng)
    if p.dither_db is not None:
        out = out + _noise_at(out, p.dither_db, rng)
    peak = float(np.abs(out).max())
    return (out / peak * 0.999 if peak > 0.999 else out).astype(np.float32)
