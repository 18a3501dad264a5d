"""The embedded default speech encoder: the toy's Whisper analogue, pretrained once, then reused.

    python -m toy.encoder                         # -> data/models/encoder (skipped when built)
    python -m toy.encoder --force --max-minutes 15

Real speech LLMs start from an encoder that already knows phonetic units
(Whisper), so they hear words their instruction data never had, in voices and rooms
they never heard. This builds the toy equivalent: a corpus of carrier sentences (the
toy world's question and answer templates) filled with random pseudo-names drawn
from the toy world's own name grammar but *disjoint from every word of the samples*
(no world name is ever heard here), spoken through the speech stage's synthesizers
(`--tts`, default espeak-ng's 98-voice grid and Festival's voices, in equal shares),
each clip perturbed (pipeline.augment: speed, vocal-tract length, white noise, rooms
of its own, a dither floor), and a conv-transformer (4x subsampling: 40 ms frames)
trained with CTC against one phoneme inventory whoever speaks: espeak-ng's en-us
phonemes of the text (`espeak-ng -x`). Training stops when the phoneme error rate on
sentences with *held-out* pseudo-names (never heard in training) reaches the target,
or at the budget. The build report measures the PER in every voice and condition it
never heard too: espeak-ng's en-029, a whole held-out synthesizer (`--heldout-tts`,
default Flite, each voice), and pipeline.conditions' rooms, pink noise and telephone
line; and lists every synthesizer, voice and perturbation it did hear, so "never
heard" can be checked. Saved: `encoder.pt` (weights), `encoder.json` (architecture
+ phoneme inventory), `speechkd_encoder.json` (the build report).
`student/train.py --encoder data/models/encoder` starts from it.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import augment, conditions, cpu_isa, schemas
from pipeline import speech as speech_stage
from pipeline.config import ConfigError, config_from_args, opt, parse_args
from pipeline.errors import cli
from pipeline.files import atomic_write, write_json_atomic
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
    tts: str = opt("espeak-ng+festival", "the corpus's synthesizers (pipeline.speech backends, '+'-joined: each "
                                         "clip spoken by one, in equal shares)")  # fmt: skip
    voices: tuple[str, ...] = opt((), "voices, one drawn per clip (default: the backends' own; a mixed backend's "
                                      "qualified, e.g. festival:ked_diphone)")  # fmt: skip
    # never used here: the build report gives the PER of held-out names spoken by it (the demo speech's
    # held-out voice is the same accent), the honest measure of how far the encoder generalizes
    heldout_voice: str = opt("en-029", "a voice never used in training (the build report's PER in it)")
    heldout_tts: str = opt("flite", "a whole synthesizer never used in training (the build report's PER in each of "
                                    "its voices); '' for none")  # fmt: skip
    rate_range: tuple[int, ...] = opt((140, 185), "speaking rates drawn from this range (words per minute, in steps "
                                                  "of 5)")  # fmt: skip
    clean_fraction: float = opt(0.2, "clips left as the synthesizer wrote them (the rest perturbed)")
    speed_range: tuple[float, ...] = opt(augment.AugmentConfig.speed, "speed perturbation factors (1: none)")
    vtln_range: tuple[float, ...] = opt(augment.AugmentConfig.vtln, "vocal-tract-length warps of the features")
    noise_p: float = opt(augment.AugmentConfig.noise_p, "share of perturbed clips with white noise added")
    room_p: float = opt(augment.AugmentConfig.room_p, "share of perturbed clips in a reverberant room")
    spec_augment: bool = opt(True, "mask 2 bands of mel bins and 2 spans of frames of every training clip")
    feature_norm: str = opt("utterance", "the encoder's input normalization: utterance (mean and variance of each "
                                         "mel bin over the clip) or none", ("utterance", "none"))  # fmt: skip
    n_mels: int = opt(80, "fbank mel bins")
    dim: int = opt(144, "encoder width")
    layers: int = opt(4, "transformer layers")
    heads: int = opt(4, "attention heads")
    subsample: int = opt(2, "stride-2 convolutions: 2 -> 40 ms frames (8x is too coarse for 12-15 phonemes/s)")
    batch_size: int = opt(32, "utterances per step")
    lr: float = opt(1.5e-3, "peak learning rate")
    warmup: int = opt(200, "linear warm-up steps")
    lr_decay: bool = opt(True, "after the warm-up, decay the learning rate linearly to a tenth at --max-steps")
    target_per: float = opt(0.07, "stop at this phoneme error rate on held-out names")
    # a step budget, so that a slower or shared machine builds the same encoder (only later); the minutes are a cap
    max_steps: int = opt(1000, "training budget in steps (0: no limit)")
    max_minutes: float = opt(15.0, "and at most this many minutes of training (synthesis not included)")
    eval_every: int = opt(100, "steps between held-out PER checks")
    seed: int = opt(0, "seeds the corpus, its perturbations, the weights and the batches")

    def augment_config(self) -> augment.AugmentConfig:
        return augment.AugmentConfig(speed=tuple(self.speed_range), vtln=tuple(self.vtln_range),
                                     noise_p=self.noise_p, room_p=self.room_p)  # fmt: skip

    def synthesizers(self) -> tuple[str, ...]:
        return speech_stage.families_of(self.tts)

    def __post_init__(self):
        if self.heldout_tts and self.heldout_tts in self.synthesizers():
            raise ConfigError(f"--heldout-tts {self.heldout_tts} is one of the corpus's synthesizers (--tts "
                              f"{self.tts}): a held-out synthesizer must never be heard in pretraining")  # fmt: skip
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise ConfigError(f"--clean-fraction must be in [0, 1], got {self.clean_fraction}")


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


SENTINEL = "zero zero zero zero."  # a clause no corpus text says, between texts: espeak-ng's lines are clauses


def phoneme_targets(texts: list[str], voice: str = "en-us") -> list[list[str]]:
    """CTC targets of each text: espeak-ng's phonemes of it in one voice whoever speaks it (`-x --sep=_`, stress
    marks dropped), '|' between words; one espeak-ng call for many texts (espeak-ng writes a line per clause, so
    the texts are told apart by a sentinel clause between them)."""
    if not texts:
        return []
    if len(texts) == 1:
        return [_tokens(" ".join(phoneme_lines(texts, voice)))]
    sentinel = " ".join(phoneme_lines([SENTINEL], voice))
    lines = phoneme_lines([x for t in texts for x in (" ".join(t.split()), SENTINEL)], voice)
    groups, current = [], []
    for line in lines:
        if line == sentinel:
            groups.append(_tokens(" ".join(current)))
            current = []
        else:
            current.append(line)
    if len(groups) != len(texts) or current:  # a text said the sentinel after all: one call each
        return [phoneme_targets([t], voice)[0] for t in texts]
    return groups


def phoneme_lines(texts: list[str], voice: str) -> list[str]:
    out = subprocess.run(["espeak-ng", "-q", "-x", "--sep=_", "-v", voice], input="\n".join(texts).encode(),
                         capture_output=True, check=True).stdout.decode()  # fmt: skip
    return [line.strip() for line in out.splitlines() if line.strip()]


def _tokens(raw: str) -> list[str]:
    tokens: list[str] = []
    for word in raw.split():
        tokens.extend(p for p in (STRESS.sub("", p) for p in word.split("_")) if p)
        tokens.append("|")
    return tokens[:-1]


@dataclass(frozen=True)
class Clip:
    """One corpus utterance: what is said, by whom, how, and (training clips) how it is perturbed."""

    text: str
    voice: str
    rate: int
    perturbation: augment.Perturbation = augment.CLEAN
    condition: str | None = None  # a held-out listening condition (pipeline.conditions), evaluation only
    key: str = ""  # seeds its perturbation's or condition's noise


def clip_features(wave: np.ndarray, sample_rate: int, clip: Clip, n_mels: int, seed: int) -> np.ndarray:
    """(frames, n_mels) float16 fbank of a synthesized clip after its perturbation or condition."""
    from pipeline.features import FeatureConfig, fbank

    wave = speech_stage.to_16k(wave, sample_rate).astype(np.float32)
    if clip.perturbation != augment.CLEAN:
        wave = augment.perturb(wave, clip.perturbation, augment.rng_for(clip.key, seed))
    if clip.condition:
        wave = conditions.apply(clip.condition, wave, clip.key, seed)
    feats = fbank(torch.from_numpy(wave), FeatureConfig(n_mels=n_mels), clip.perturbation.vtln_warp)
    return feats.to(torch.float16).numpy()


def synthesize_corpus(clips: list[Clip], backend, n_mels: int, seed: int, progress: bool, desc: str):
    """[(features, phonemes)] of the clips, in order: each (voice, rate) group in batches through the backend
    (a Festival batch is one process) and espeak-ng's phonemizer, 2 threads."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, c in enumerate(clips):
        groups.setdefault((c.voice, c.rate), []).append(i)
    size = max(1, int(getattr(backend, "batch_size", 1)))
    units = [(v, r, idx[k : k + size]) for (v, r), idx in groups.items() for k in range(0, len(idx), size)]
    out: list[tuple[np.ndarray, list[str]] | None] = [None] * len(clips)

    def one(unit):
        voice, rate, idx = unit
        texts = [clips[i].text for i in idx]
        if hasattr(backend, "synthesize_batch") and len(idx) > 1:
            waves = backend.synthesize_batch(texts, voice, rate)
        else:
            waves = [backend.synthesize(t, voice, rate) for t in texts]
        feats = [clip_features(w, sr, clips[i], n_mels, seed) for i, (w, sr) in zip(idx, waves, strict=True)]
        return idx, list(zip(feats, phoneme_targets(texts), strict=True))

    with ThreadPoolExecutor(max_workers=2) as pool, tqdm(total=len(clips), desc=desc, unit="utt",
                                                         disable=not progress) as bar:  # fmt: skip
        for idx, done in pool.map(one, units):
            for i, item in zip(idx, done):
                out[i] = item
            bar.update(len(idx))
    return out


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


def spec_augment(speech: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Two bands of up to 8 mel bins and two spans of up to 5% of each clip's frames set to 0 (the mean, after the
    encoder's utterance normalization); seeded by `gen`."""
    out = speech.clone()
    B, T, F = out.shape
    for b in range(B):
        n = int(lengths[b])
        for _ in range(2):
            w = int(torch.randint(0, 9, (1,), generator=gen))
            f0 = int(torch.randint(0, max(1, F - w), (1,), generator=gen))
            out[b, :, f0 : f0 + w] = 0
            w = int(torch.randint(0, max(1, n // 20) + 1, (1,), generator=gen))
            t0 = int(torch.randint(0, max(1, n - w), (1,), generator=gen))
            out[b, t0 : t0 + w] = 0
    return out


def learning_rate(cfg: EncoderBuildConfig, step: int) -> float:
    """Linear warm-up to --lr, then constant, or (with a step budget) linear decay to a tenth of it."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if cfg.lr_decay and cfg.max_steps and step >= cfg.warmup:
        lr *= 1.0 - 0.9 * (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return lr


def corpus_clips(cfg: EncoderBuildConfig, rng: random.Random, names: list[str], voices: tuple[str, ...], n: int,
                 prefix: str, perturbed: bool = False, condition: str | None = None) -> list[Clip]:  # fmt: skip
    """n carrier sentences over `names`, each in a voice drawn (a mixed backend's synthesizers in equal shares),
    at a drawn rate; training clips (`perturbed`) with their perturbation drawn, seeded by the clip's key."""
    pools = speech_stage.by_synthesizer(list(voices))
    acfg = cfg.augment_config()
    lo, hi = cfg.rate_range
    out = []
    for i in range(n):
        key = f"{prefix}{i}"
        p = augment.CLEAN
        if perturbed and rng.random() >= cfg.clean_fraction:
            p = augment.draw(acfg, augment.rng_for(key, cfg.seed))
        out.append(Clip(carrier_sentence(rng, names), rng.choice(rng.choice(pools)), rng.randrange(lo, hi + 1, 5), p,
                        condition, key))  # fmt: skip
    return out


def build_encoder(samples_dir: Path = schemas.SAMPLES_DIR, out_dir: Path = ENCODER_DIR,
                  cfg: EncoderBuildConfig = EncoderBuildConfig(), progress: bool = True) -> dict:  # fmt: skip
    """Synthesize the pretraining corpus, train until the held-out PER target (or the budget), measure every
    never-heard voice, synthesizer and condition, save."""
    from pipeline.samples import load_samples

    t0 = time.monotonic()
    rng = random.Random(cfg.seed)
    samples = load_samples(samples_dir)
    forbidden = _words(samples["prompt"].to_pylist() + samples["response"].to_pylist())
    names = pretraining_names(rng, 3000 + cfg.heldout_names, forbidden)
    heldout, train_names = names[: cfg.heldout_names], names[cfg.heldout_names :]
    backend = speech_stage.make_backend(cfg.tts)  # a missing synthesizer or voice: one line naming its package
    voices = tuple(cfg.voices) or backend.default_voices
    if cfg.heldout_voice in voices:
        raise ConfigError(f"the held-out voice {cfg.heldout_voice!r} is also a training voice")
    espeak = speech_stage.EspeakNG()
    held_tts = speech_stage.make_backend(cfg.heldout_tts) if cfg.heldout_tts else None
    n_cond = cfg.eval_utterances // 3

    train_clips = corpus_clips(cfg, rng, train_names, voices, cfg.utterances, "train-", perturbed=True)
    sets = {  # name -> (clips, backend): the evaluation sets, none perturbed in training's way
        "heldout": (corpus_clips(cfg, rng, heldout, voices, cfg.eval_utterances, "held-"), backend),
        "heard": (corpus_clips(cfg, rng, train_names, voices, cfg.eval_utterances // 2, "heard-"), backend),
        f"voice:{cfg.heldout_voice}": (corpus_clips(cfg, rng, heldout, (cfg.heldout_voice,),
                                                    cfg.eval_utterances // 2, "voice-"), espeak),  # fmt: skip
    }
    if held_tts is not None:
        per_voice = max(1, cfg.eval_utterances // (2 * len(held_tts.default_voices)))
        for v in held_tts.default_voices:
            sets[f"tts:{cfg.heldout_tts}:{v}"] = (corpus_clips(cfg, rng, heldout, (v,), per_voice, f"tts-{v}-"),
                                                   held_tts)  # fmt: skip
    for condition in conditions.CONDITIONS:
        sets[f"condition:{condition}"] = (corpus_clips(cfg, rng, heldout, voices, n_cond, f"cond-{condition}-",
                                                       condition=condition), backend)  # fmt: skip
    train = synthesize_corpus(train_clips, backend, cfg.n_mels, cfg.seed, progress, "encoder corpus")
    evals = {name: synthesize_corpus(clips, b, cfg.n_mels, cfg.seed, progress, name)
             for name, (clips, b) in sets.items()}  # fmt: skip
    synth_s = time.monotonic() - t0
    inventory = sorted({p for corpus in [train, *evals.values()] for _, ph in corpus for p in ph})
    vocab = {p: i for i, p in enumerate(inventory)}
    held = evals["heldout"]

    torch.manual_seed(cfg.seed)
    encoder, head = make_encoder(cfg, len(vocab))
    params = list(encoder.parameters()) + list(head.parameters())
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    order = np.random.default_rng(cfg.seed)
    masks = torch.Generator().manual_seed(cfg.seed)
    step, per, history = 0, 1.0, []
    t_train = time.monotonic()
    bar = tqdm(desc="encoder (phoneme CTC)", unit="step", disable=not progress)
    while True:
        idx = order.choice(len(train), cfg.batch_size, replace=False)
        speech, lengths, targets = _batch(train, idx, vocab)
        if cfg.spec_augment:
            speech = spec_augment(speech, lengths, masks)
        x, out_len = encoder(speech, lengths)
        log_probs = head(x).float().log_softmax(-1).transpose(0, 1)
        loss = torch.nn.functional.ctc_loss(log_probs, torch.cat(targets), out_len,
                                            torch.tensor([len(t) for t in targets]), blank=len(vocab),
                                            zero_infinity=True)  # fmt: skip
        for g in optim.param_groups:
            g["lr"] = learning_rate(cfg, step)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        step += 1
        bar.update(1)
        bar.set_postfix(ctc=f"{loss.item():.3f}", per=f"{per:.3f}")
        minutes = (time.monotonic() - t_train) / 60
        out_of_budget = minutes >= cfg.max_minutes or (cfg.max_steps and step >= cfg.max_steps)
        if step % cfg.eval_every == 0 or out_of_budget:
            per = phoneme_error_rate(encoder, head, held, vocab)
            history.append({"step": step, "minutes": round(minutes, 2), "heldout_per": round(per, 4)})
            tqdm.write(f"encoder step {step}: held-out-name PER {per:.1%} ({minutes:.1f} min)")
            if per <= cfg.target_per or out_of_budget:
                break
    bar.close()
    per_set = {name: round(per if name == "heldout" else phoneme_error_rate(encoder, head, corpus, vocab), 4)
               for name, corpus in evals.items()}  # held-out names: measured at the last step already
    heard_voices = sorted({c.voice for c in train_clips})
    report = {
        "heldout_per": round(per, 4),
        "heard_per": per_set["heard"],
        "heldout_voice_per": per_set[f"voice:{cfg.heldout_voice}"],
        "heldout_voice": cfg.heldout_voice,
        "heldout_tts": cfg.heldout_tts or None,
        "heldout_tts_per": (round(float(np.mean([v for k, v in per_set.items() if k.startswith("tts:")])), 4)
                            if held_tts is not None else None),  # fmt: skip
        "per": per_set,  # every evaluation set: held-out names, heard names, the held-out voice, synthesizer, conditions
        # what the encoder heard, so that "never heard" can be checked
        "synthesizers": list(cfg.synthesizers()),
        "voices_heard": heard_voices,
        "voices": len(heard_voices),
        "augmentation": {"clean_fraction": cfg.clean_fraction, "spec_augment": cfg.spec_augment,
                         **cfg.augment_config().describe(),
                         "perturbed_clips": sum(c.perturbation != augment.CLEAN for c in train_clips)},  # fmt: skip
        "heldout_conditions": list(conditions.CONDITIONS),
        "feature_norm": cfg.feature_norm,
        "reached_target": per <= cfg.target_per,
        "target_per": cfg.target_per,
        "steps": step,
        "train_seconds": round(time.monotonic() - t_train, 1),
        "synthesis_seconds": round(synth_s, 1),
        "seconds": round(time.monotonic() - t0, 1),
        "utterances": cfg.utterances,
        "heldout_names": cfg.heldout_names,
        "phonemes": len(vocab),
        "cpu": cpu_isa.describe(),  # the arithmetic it was built with (pipeline.cpu_isa)
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


def never_heard_summary(report: dict) -> str:
    """One line of a build report's phoneme errors in what the encoder never heard (voice, synthesizer, conditions)."""
    per = report.get("per", {})
    parts = [f"{report.get('heldout_voice', '?')} {report.get('heldout_voice_per', float('nan')):.1%}"]
    if report.get("heldout_tts"):
        parts.append(f"{report['heldout_tts']} {report['heldout_tts_per']:.1%}")
    parts += [f"{k.split(':', 1)[1]} {v:.1%}" for k, v in per.items() if k.startswith("condition:")]
    return ", ".join(parts)


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
    print(f"toy encoder: never heard: {never_heard_summary(r)}")
    print(f"toy encoder: held-out-name PER {r['heldout_per']:.1%} (heard names {r['heard_per']:.1%}) after "
          f"{r['steps']} steps, {r['seconds'] / 60:.1f} min in all -> {out}")


if __name__ == "__main__":
    import sys

    sys.exit(main())
