"""Joins the teacher cache with the speech features and builds the two student inputs.

Channel T: the chat-templated text prompt, then the response tokens.
Channel S: the same template with the speech embeddings in place of the prompt
text, then the response tokens. In both, the response tokens are exactly the
cached ones, so logits at the response positions line up with the cached
teacher targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.chat import render_prompt
from pipeline.features import load_features
from pipeline.fingerprint import tokenizer_sha256
from pipeline.samples import load_samples

PLACEHOLDER = "\u2047SPEECH\u2047"


class TokenizerMismatch(ValueError):
    pass


def check_tokenizer(reader: CacheReader, tokenizer) -> None:
    """Refuse a cache whose token ids mean something else to the student."""
    mine, theirs = tokenizer_sha256(tokenizer), reader.fingerprint.get("tokenizer_sha256")
    if mine != theirs:
        raise TokenizerMismatch(
            f"the cache at {reader.dir} was made with a different tokenizer (sha256 {theirs[:12]}…) than the "
            f"student backbone's ({mine[:12]}…): its token ids would not mean the same tokens. Use a backbone with "
            f"the teacher's tokenizer (--backbone {reader.fingerprint.get('model')}) or rebuild the cache"
        )


@dataclass(frozen=True)
class SpeechTemplate:
    """Token ids of the chat template before and after the user's prompt."""

    prefix_ids: list[int]
    suffix_ids: list[int]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpeechTemplate":
        text = render_prompt(tokenizer, PLACEHOLDER)
        if text.count(PLACEHOLDER) != 1:
            raise ValueError("the chat template does not contain the user's prompt exactly once")
        before, after = text.split(PLACEHOLDER)
        enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
        return cls(enc(before), enc(after))


@dataclass
class Example:
    sample_id: str
    rendition: str | None
    prompt_ids: list[int]  # channel T: templated text prompt
    transcript_ids: list[int]  # the prompt text alone + end-of-turn (speech alignment target)
    speech: np.ndarray | None  # channel S: (frames, n_mels) float16
    response_ids: np.ndarray  # (n,)
    topk_ids: np.ndarray  # (n, k)
    topk_logprobs: np.ndarray  # (n, k)
    tail_logmass: np.ndarray  # (n,)


@dataclass
class JoinReport:
    examples: int = 0
    samples: int = 0
    cache_rows_in_split: int = 0
    missing_features: list[str] = field(default_factory=list)  # cached, but no speech features
    missing_cache: list[str] = field(default_factory=list)  # in the split, but not cached

    def summary(self) -> str:
        return (
            f"{self.examples} examples from {self.samples} samples; {len(self.missing_cache)} samples of the split "
            f"have no cache row, {len(self.missing_features)} cached samples have no speech features"
        )


def inputs_from_manifest(reader: CacheReader, samples_dir, features_dir) -> tuple[Path, Path]:
    inputs = reader.manifest.get("inputs", {})
    samples = samples_dir or inputs.get("samples_dir")
    features = features_dir or inputs.get("features_dir")
    if not samples or not features:
        raise ValueError(f"{reader.dir}/manifest.json does not say where the samples/features are: pass them")
    return Path(samples), Path(features)


def load_examples(
    cache_dir: Path, tokenizer, samples_dir: Path | None = None, features_dir: Path | None = None,
    split: str = "train", need_speech: bool = True,
) -> tuple[list[Example], JoinReport]:  # fmt: skip
    """Examples of one split: one per (cached sample, speech rendition)."""
    reader = CacheReader(cache_dir)
    check_tokenizer(reader, tokenizer)
    samples_dir, features_dir = inputs_from_manifest(reader, samples_dir, features_dir)
    samples = {r["sample_id"]: r for r in load_samples(samples_dir, split).to_pylist()}
    renditions: dict[str, list[tuple[str, np.ndarray]]] = {}
    if need_speech:
        for (sid, rend), feats in load_features(features_dir).items():
            if sid in samples:
                renditions.setdefault(sid, []).append((rend, feats))
    report = JoinReport(samples=len(samples))
    examples, seen = [], set()
    for row in reader.iter_rows():  # streams shard by shard
        sid = row["sample_id"]
        if sid not in samples:
            continue
        seen.add(sid)
        report.cache_rows_in_split += 1
        d = reader.decode_row(row)
        prompt = samples[sid]["prompt"]
        prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        transcript_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        speech = renditions.get(sid, []) if need_speech else [(None, None)]
        if not speech:
            report.missing_features.append(sid)
            continue
        for rend, feats in sorted(speech, key=lambda x: x[0] or ""):
            examples.append(Example(sid, rend, prompt_ids, transcript_ids, feats, d["token_ids"], d["topk_ids"],
                                    d["topk_logprobs"], d["tail_logmass"]))  # fmt: skip
    report.missing_cache = sorted(set(samples) - seen)
    report.examples = len(examples)
    return examples, report


class BatchSampler:
    """Deterministic, resumable order: batch `step` is a function of (seed, step) only."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = max(1, n // batch_size)

    def indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.per_epoch)
        order = list(range(self.n))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order[i * self.batch_size : (i + 1) * self.batch_size]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Targets, text inputs and speech features of a batch, padded."""
    B = len(examples)
    n = max(len(e.response_ids) for e in examples)
    k = examples[0].topk_ids.shape[1]
    batch = {
        "response_ids": torch.full((B, n), pad_id, dtype=torch.long),
        "mask": torch.zeros(B, n, dtype=torch.bool),
        "topk_ids": torch.zeros(B, n, k, dtype=torch.long),
        "topk_logprobs": torch.zeros(B, n, k),
        "tail_logmass": torch.full((B, n), float("-inf")),
    }
    for b, e in enumerate(examples):
        m = len(e.response_ids)
        batch["response_ids"][b, :m] = torch.from_numpy(e.response_ids)
        batch["mask"][b, :m] = True
        batch["topk_ids"][b, :m] = torch.from_numpy(e.topk_ids)
        batch["topk_logprobs"][b, :m] = torch.from_numpy(e.topk_logprobs)
        batch["tail_logmass"][b, :m] = torch.from_numpy(e.tail_logmass)
    # channel T: prompt + response, right-padded; response_pos[b, t] is where token t is predicted
    lens = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    L = max(lens)
    batch["text_ids"] = torch.full((B, L), pad_id, dtype=torch.long)
    batch["text_attention"] = torch.zeros(B, L, dtype=torch.long)
    batch["text_response_pos"] = torch.zeros(B, n, dtype=torch.long)
    for b, e in enumerate(examples):
        ids = e.prompt_ids + e.response_ids.tolist()
        batch["text_ids"][b, : len(ids)] = torch.tensor(ids)
        batch["text_attention"][b, : len(ids)] = 1
        p = len(e.prompt_ids)
        batch["text_response_pos"][b, : len(e.response_ids)] = torch.arange(p - 1, p - 1 + len(e.response_ids))
    m = max(len(e.transcript_ids) for e in examples)
    batch["transcript_ids"] = torch.full((B, m), pad_id, dtype=torch.long)
    batch["transcript_mask"] = torch.zeros(B, m, dtype=torch.bool)
    for b, e in enumerate(examples):
        batch["transcript_ids"][b, : len(e.transcript_ids)] = torch.tensor(e.transcript_ids)
        batch["transcript_mask"][b, : len(e.transcript_ids)] = True
    if examples[0].speech is not None:
        T = max(e.speech.shape[0] for e in examples)
        batch["speech"] = torch.zeros(B, T, examples[0].speech.shape[1])
        batch["speech_lengths"] = torch.tensor([e.speech.shape[0] for e in examples])
        for b, e in enumerate(examples):
            batch["speech"][b, : e.speech.shape[0]] = torch.from_numpy(e.speech.astype(np.float32))
    return batch


def speech_inputs(
    model, template: SpeechTemplate, batch: dict, target: str = "response", encoded=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel S embeddings: [template prefix, speech, template suffix, target tokens], right-padded.

    target "response": the cached response (channel S proper); "transcript": the
    prompt text itself (speech alignment; pass an empty template). `encoded`: the
    encoder's output for batch["speech"], when the caller has it already.
    Returns (embeds (B, L, H), attention (B, L), target_pos (B, n)): logits at
    target_pos[b, t] predict target token t.
    """
    ids_key, mask_key = ("response_ids", "mask") if target == "response" else ("transcript_ids", "transcript_mask")
    speech, lengths = model.speech_embeddings(batch["speech"], batch["speech_lengths"], encoded)
    embed = model.embed
    device = speech.device
    prefix = embed(torch.tensor(template.prefix_ids, dtype=torch.long, device=device))
    suffix = embed(torch.tensor(template.suffix_ids, dtype=torch.long, device=device))
    resp = embed(batch[ids_key])
    rows, positions = [], []
    n = batch[ids_key].shape[1]
    for b in range(speech.shape[0]):
        m = int(batch[mask_key][b].sum())
        row = torch.cat([prefix, speech[b, : lengths[b]], suffix, resp[b, :m]])
        start = prefix.shape[0] + int(lengths[b]) + suffix.shape[0]
        rows.append(row)
        pos = torch.zeros(n, dtype=torch.long)
        pos[:m] = torch.arange(start - 1, start - 1 + m)
        positions.append(pos)
    L = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), L, speech.shape[-1], device=device, dtype=speech.dtype)
    attention = torch.zeros(len(rows), L, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        embeds[b, : r.shape[0]] = r
        attention[b, : r.shape[0]] = 1
    return embeds, attention, torch.stack(positions).to(device)


def gather_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits at (B, n) positions -> (B, n, V)."""
    return torch.gather(logits, 1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
