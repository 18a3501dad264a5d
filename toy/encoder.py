"""The embedded default speech encoder: the toy's Whisper analogue, pretrained once, then reused.

    python -m toy.encoder                         # -> data/models/encoder (skipped when built)
    python -m toy.encoder --force --max-minutes 15

Real speech LLMs start from an encoder that already knows phonetic units
(Whisper), so they hear words their instruction data never had. This builds the
toy equivalent: a corpus of carrier sentences (the toy world's question and
answer templates) filled with random pseudo-names drawn from the toy world's own
name grammar but *disjoint from every word of the samples* (no world name is ever
heard here), spoken by espeak-ng over many voices, rates and pitches, and a
conv-transformer (4x subsampling: 40 ms frames) trained with CTC against
espeak-ng's own phonemes (`espeak-ng -x`). Training stops when the phoneme error
rate on sentences with *held-out* pseudo-names (never heard in training) reaches
the target, or at the time budget. Saved: `encoder.pt` (weights), `encoder.json`
(architecture + phoneme inventory), `speechkd_encoder.json` (the build report:
held-out PER, steps, seconds). `student/train.py --encoder data/models/encoder`
starts from it.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import schemas
from pipeline.config import config_from_args, opt, parse_args
from pipeline.errors import cli
from pipeline.files import atomic_write, write_json_atomic
from pipeline.speech import ACCENTS, VARIANTS, voice_grid
from toy.world import ADDITION, CITY_ENDINGS, COLOURS, COUNTRY_ENDINGS, RELATIONS, STRESS, _name, phonemize

ENCODER_DIR = schemas.MODELS_DIR / "encoder"
BUILD_REPORT = "speechkd_encoder.json"
CONFIG_FILE = "encoder.json"
WEIGHTS_FILE = "encoder.pt"


@dataclass(frozen=True)
class EncoderBuildConfig:
    utterances: int = opt(6000, "training sentences")
    eval_utterances: int = opt(300, "sentences with held-out names (the stopping criterion's)")
    heldout_names: int = opt(300, "pseudo-names never heard in training")
    # every accent x every voice variant: the training speech's own grid (pipeline.speech.voice_grid)
    accents: tuple[str, ...] = opt(ACCENTS, "espeak-ng voices (accents)")
    variants: tuple[str, ...] = opt(VARIANTS, "espeak-ng variants crossed with every accent ('' = the accent's own)")
    # never used here: the build report gives the PER of held-out names spoken by it (the demo speech's
    # held-out voice is the same accent), the honest measure of how far the encoder generalizes
    heldout_voice: str = opt("en-029", "a voice never used in training (the build report's PER in it)")
    rate_range: tuple[int, ...] = opt((140, 185), "speaking rates drawn from this range (words per minute)")
    pitch_range: tuple[int, ...] = opt((35, 65), "espeak-ng pitches drawn from this range")
    n_mels: int = opt(80, "fbank mel bins")
    dim: int = opt(144, "encoder width")
    layers: int = opt(4, "transformer layers")
    heads: int = opt(4, "attention heads")
    subsample: int = opt(2, "stride-2 convolutions: 2 -> 40 ms frames (8x is too coarse for 12-15 phonemes/s)")
    batch_size: int = opt(32, "utterances per step")
    lr: float = opt(1.5e-3, "peak learning rate")
    warmup: int = opt(200, "linear warm-up steps")
    target_per: float = opt(0.07, "stop at this phoneme error rate on held-out names")
    max_minutes: float = opt(6.0, "training budget (synthesis not included)")
    eval_every: int = opt(100, "steps between held-out PER checks")
    seed: int = opt(0, "seeds the corpus, the weights and the batches")


@dataclass
class EncoderBuild:
    """`python -m toy.encoder`: where the build reads and writes."""

    samples: str = opt(str(schemas.SAMPLES_DIR), "the world whose words the corpus avoids")
    out: str = opt(str(ENCODER_DIR), "where the encoder is saved")
    force: bool = opt(False, "rebuild even if a complete build exists")


# --- corpus ---------------------------------------------------------------------------------------


def _words(texts) -> set[str]:
    return {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}


def pseudo_names(rng: random.Random, n: int, forbidden: set[str]) -> list[str]:
    """n distinct pseudo country/city names from the toy world's grammar, none of them a forbidden word."""
    out, seen = [], set(forbidden)
    while len(out) < n:
        ending = rng.choice(COUNTRY_ENDINGS + CITY_ENDINGS)
        name = _name(rng, rng.choice((1, 2, 2, 3)), ending)
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out


def pretraining_names(rng: random.Random, n: int, world_words: set[str]) -> list[str]:
    """n pseudo-names that neither are spelled nor sound (espeak-ng phonemes) like any word of the world, and
    no two of which sound alike, so no world name is ever heard in pretraining and a held-out name never
    sounds like a training one."""
    heard = set(phonemize(sorted(world_words)))
    names: list[str] = []
    while len(names) < n:
        candidates = pseudo_names(rng, n - len(names) + 64, world_words | {x.lower() for x in names})
        for name, sound in zip(candidates, phonemize(candidates)):
            if sound not in heard and len(names) < n:
                heard.add(sound)
                names.append(name)
    return names


def carrier_sentence(rng: random.Random, names: list[str]) -> str:
    """A toy-world question or answer with pseudo-names in its slots."""
    relation = rng.choice(RELATIONS + (ADDITION,))
    if relation is ADDITION:
        a, b = rng.randrange(20), rng.randrange(20)
        fields = {"a": a, "b": b, "v": a + b}
    else:
        value = {"capital": rng.choice(names), "colour": rng.choice(COLOURS), "year": str(rng.randint(1000, 1999)),
                 "founder": f"{rng.choice(names)} {rng.choice(names)[:4].capitalize()}son"}[relation.name]  # fmt: skip
        fields = {"e": rng.choice(names), "v": value}
    template = rng.choice(relation.prompts + (relation.answer,) * 4)
    return template.format(**fields)


def speak(text: str, voice: str, rate: int, pitch: int, n_mels: int) -> tuple[np.ndarray, list[str]]:
    """(fbank (frames, n_mels) float16, phonemes) of one utterance."""
    from pipeline.features import FeatureConfig, compute_features, load_audio

    with tempfile.NamedTemporaryFile(suffix=".wav") as wav, tempfile.NamedTemporaryFile(suffix=".txt") as ph:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-x", "--sep=_",
                        f"--phonout={ph.name}", "-w", wav.name], input=text.encode(), check=True,
                       capture_output=True)  # fmt: skip
        cfg = FeatureConfig(n_mels=n_mels)
        feats = compute_features(load_audio(Path(wav.name), cfg.sample_rate), cfg).to(torch.float16).numpy()
        raw = Path(ph.name).read_text()
    tokens: list[str] = []
    for word in raw.split():
        parts = [STRESS.sub("", p) for p in word.split("_")]
        tokens.extend(p for p in parts if p)
        tokens.append("|")
    return feats, tokens[:-1]


def synthesize_corpus(items: list[tuple[str, str, int, int]], n_mels: int, progress: bool, desc: str):
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(speak, t, v, r, p, n_mels) for t, v, r, p in items]
        return [f.result() for f in tqdm(futures, desc=desc, unit="utt", disable=not progress)]


# --- model ------------------------------------------------------------------------------------------


def make_encoder(cfg: EncoderBuildConfig | dict, n_phonemes: int):
    """(encoder, CTC head): the student's conv-transformer at this size, plus a phoneme CTC head."""
    from student.model import toy_encoder_architecture

    c = cfg if isinstance(cfg, dict) else asdict(cfg)
    return toy_encoder_architecture(c), torch.nn.Linear(c["dim"], n_phonemes + 1)


def _batch(corpus, idx, vocab):
    from student.data import pad_speech

    clips = [corpus[i][0] for i in idx]
    padded = pad_speech(clips)
    targets = [torch.tensor([vocab[p] for p in corpus[i][1]]) for i in idx]
    return padded["speech"], padded["speech_lengths"], targets


def _edit_distance(a: list, b: list) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


@torch.no_grad()
def phoneme_error_rate(encoder, head, corpus, vocab, batch_size: int = 64) -> float:
    """Greedy CTC decoding against the references: edit distance / reference length, over the corpus."""
    encoder.eval()
    inv = {i: p for p, i in vocab.items()}
    blank = len(vocab)
    errors = total = 0
    for start in range(0, len(corpus), batch_size):
        idx = list(range(start, min(start + batch_size, len(corpus))))
        speech, lengths, targets = _batch(corpus, idx, vocab)
        x, out_len = encoder(speech, lengths)
        best = head(x).argmax(-1)
        for b, t in enumerate(targets):
            seq, last = [], None
            for k in best[b, : out_len[b]].tolist():
                if k != last and k != blank:
                    seq.append(inv[k])
                last = k
            ref = [inv[int(k)] for k in t]
            errors += _edit_distance(seq, ref)
            total += len(ref)
    encoder.train()
    return errors / max(total, 1)


# --- build --------------------------------------------------------------------------------------------


def is_built(out_dir: Path = ENCODER_DIR) -> bool:
    out_dir = Path(out_dir)
    return all((out_dir / f).exists() for f in (BUILD_REPORT, CONFIG_FILE, WEIGHTS_FILE))


def build_encoder(samples_dir: Path = schemas.SAMPLES_DIR, out_dir: Path = ENCODER_DIR,
                  cfg: EncoderBuildConfig = EncoderBuildConfig(), progress: bool = True) -> dict:  # fmt: skip
    """Synthesize the pretraining corpus, train until the held-out PER target (or the budget), save."""
    from pipeline.samples import load_samples

    t0 = time.monotonic()
    rng = random.Random(cfg.seed)
    samples = load_samples(samples_dir)
    forbidden = _words(samples["prompt"].to_pylist() + samples["response"].to_pylist())
    names = pretraining_names(rng, 3000 + cfg.heldout_names, forbidden)
    heldout, train_names = names[: cfg.heldout_names], names[cfg.heldout_names :]
    voices = voice_grid(cfg.accents, cfg.variants)
    if cfg.heldout_voice in voices:
        raise ValueError(f"the held-out voice {cfg.heldout_voice!r} is also a training voice")

    def item(pool: list[str], voice: str | None = None) -> tuple[str, str, int, int]:
        return (carrier_sentence(rng, pool), voice or rng.choice(voices), rng.randint(*cfg.rate_range),
                rng.randint(*cfg.pitch_range))  # fmt: skip

    train_items = [item(train_names) for _ in range(cfg.utterances)]
    eval_items = [item(heldout) for _ in range(cfg.eval_utterances)]
    seen_items = [item(train_names) for _ in range(cfg.eval_utterances // 2)]
    voice_items = [item(heldout, cfg.heldout_voice) for _ in range(cfg.eval_utterances // 2)]
    train = synthesize_corpus(train_items, cfg.n_mels, progress, "encoder corpus")
    held = synthesize_corpus(eval_items, cfg.n_mels, progress, "held-out names")
    seen = synthesize_corpus(seen_items, cfg.n_mels, progress, "heard names")
    new_voice = synthesize_corpus(voice_items, cfg.n_mels, progress, f"held-out voice {cfg.heldout_voice}")
    synth_s = time.monotonic() - t0
    inventory = sorted({p for _, ph in train + held + seen + new_voice for p in ph})
    vocab = {p: i for i, p in enumerate(inventory)}

    torch.manual_seed(cfg.seed)
    encoder, head = make_encoder(cfg, len(vocab))
    params = list(encoder.parameters()) + list(head.parameters())
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    order = np.random.default_rng(cfg.seed)
    step, per, history = 0, 1.0, []
    t_train = time.monotonic()
    bar = tqdm(desc="encoder (phoneme CTC)", unit="step", disable=not progress)
    while True:
        idx = order.choice(len(train), cfg.batch_size, replace=False)
        speech, lengths, targets = _batch(train, idx, vocab)
        x, out_len = encoder(speech, lengths)
        log_probs = head(x).float().log_softmax(-1).transpose(0, 1)
        loss = torch.nn.functional.ctc_loss(log_probs, torch.cat(targets), out_len,
                                            torch.tensor([len(t) for t in targets]), blank=len(vocab),
                                            zero_infinity=True)  # fmt: skip
        for g in optim.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        step += 1
        bar.update(1)
        bar.set_postfix(ctc=f"{loss.item():.3f}", per=f"{per:.3f}")
        minutes = (time.monotonic() - t_train) / 60
        if step % cfg.eval_every == 0 or minutes >= cfg.max_minutes:
            per = phoneme_error_rate(encoder, head, held, vocab)
            history.append({"step": step, "minutes": round(minutes, 2), "heldout_per": round(per, 4)})
            tqdm.write(f"encoder step {step}: held-out-name PER {per:.1%} ({minutes:.1f} min)")
            if per <= cfg.target_per or minutes >= cfg.max_minutes:
                break
    bar.close()
    report = {
        "heldout_per": round(per, 4),
        "heard_per": round(phoneme_error_rate(encoder, head, seen, vocab), 4),
        "heldout_voice_per": round(phoneme_error_rate(encoder, head, new_voice, vocab), 4),
        "heldout_voice": cfg.heldout_voice,
        "voices": len(voices),
        "reached_target": per <= cfg.target_per,
        "target_per": cfg.target_per,
        "steps": step,
        "train_seconds": round(time.monotonic() - t_train, 1),
        "synthesis_seconds": round(synth_s, 1),
        "seconds": round(time.monotonic() - t0, 1),
        "utterances": cfg.utterances,
        "heldout_names": cfg.heldout_names,
        "phonemes": len(vocab),
        "history": history,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps({"kind": "speechkd-toy-encoder", "config": asdict(cfg),
                                                   "phonemes": inventory}, indent=2))  # fmt: skip
    with atomic_write(out_dir / WEIGHTS_FILE) as tmp:
        torch.save({"encoder": encoder.state_dict(), "ctc_head": head.state_dict()}, tmp)
    write_json_atomic(out_dir / BUILD_REPORT, report)  # written last: marks a complete build
    return report


@cli("toy.encoder")
def main(argv: list[str] | None = None) -> None:
    args = parse_args(EncoderBuildConfig, EncoderBuild, argv=argv, description=__doc__)
    cfg, run = config_from_args(EncoderBuildConfig, args), config_from_args(EncoderBuild, args)
    out = Path(run.out)
    if is_built(out) and not run.force:
        report = json.loads((out / BUILD_REPORT).read_text())
        print(f"toy encoder already built: held-out-name PER {report['heldout_per']:.1%} -> {out}")
        return
    r = build_encoder(Path(run.samples), out, cfg)
    print(f"toy encoder: held-out-name PER {r['heldout_per']:.1%} (heard names {r['heard_per']:.1%}) after "
          f"{r['steps']} steps, {r['seconds'] / 60:.1f} min in all -> {out}")


if __name__ == "__main__":
    import sys

    sys.exit(main())
