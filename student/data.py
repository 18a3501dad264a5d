"""The training examples of a split (cache rows joined with their speech) and the two student inputs of each.

A sample is a conversation (pipeline.chat): its system prompt, user and assistant turns, the scored assistant
turns (the last, or every one: the cache's --turns) in the chat template. Channel T is that conversation as text;
channel S is the same with each spoken user turn's speech in its place. In both, each scored turn's tokens are
exactly the cached ones, so the student's hidden states at the response positions line up with the cached teacher
targets. What the conversation becomes is the student kind's (`ComposedPrompts`: speechkd's own speech stack
reads the teacher's template and stored features; `SpeechLLMPrompts`: a pretrained speech LLM's own template and
processor on the waveform); the targets and their padding are shared (`collate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.chat import Piece, conversation, render_prompt, segments, to_score, token_ids
from pipeline.fingerprint import tokenizer_sha256
from student.config import ConfigError
from student.inputs import RunInputs
from student.vocab import TokenizerMismatch, VocabCheck, check_vocab

PLACEHOLDER = "\u2047SPEECH\u2047"


def check_tokenizer(reader: CacheReader, tokenizer) -> VocabCheck:
    """Whether the cache's ids mean the same tokens to the student (student.vocab's rule): the fingerprint's
    tokenizer hash when it is the student's (nothing else to read), else an id-by-id comparison with the teacher's
    tokenizer; TokenizerMismatch (one line: the first id that differs, both tokens) when they do not."""
    mine, theirs = tokenizer_sha256(tokenizer), reader.fingerprint.get("tokenizer_sha256")
    if mine == theirs:
        return VocabCheck(True, len(tokenizer), len(tokenizer))
    from transformers import AutoTokenizer

    teacher = reader.teacher
    try:
        teacher_tok = AutoTokenizer.from_pretrained(teacher)
    except (OSError, ValueError) as exc:
        raise TokenizerMismatch(f"the cache at {reader.dir} was made with a different tokenizer than the student's, "
                                f"and the teacher's tokenizer ({teacher}) cannot be read to compare them id by id "
                                f"({type(exc).__name__}); make it readable there or use a student with the "
                                f"teacher's tokenizer") from None  # fmt: skip
    if tokenizer_sha256(teacher_tok) != theirs:
        raise TokenizerMismatch(f"the teacher's tokenizer at {teacher} is not the one the cache at {reader.dir} was "
                                f"made with (its sha256 differs from the fingerprint's): rebuild the cache, or point "
                                f"the manifest's teacher at the original")  # fmt: skip
    try:
        return check_vocab(teacher_tok, tokenizer, reader.dir)
    except TokenizerMismatch as exc:
        raise TokenizerMismatch(f"the cache at {reader.dir} was made with a different tokenizer: {exc}") from None


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


# A conversation laid out for one channel: ("ids", token ids) | ("clip", j: the example's j-th clip, whose speech
# goes here) | ("response", a, b: the cached response tokens a..b-1, one scored turn)
Segment = tuple


def layout(pieces: list[Piece], tokenizer, turn_lengths, clip_of_turn: dict[int, int] | None = None) -> list[Segment]:
    """The segments of a conversation's pieces (pipeline.chat.segments): text tokenized on its own (as the
    teacher's), each scored turn mapped onto its share of the cached response (`turn_lengths`, in order), each
    spoken turn onto its clip (`clip_of_turn`: turn -> the example's clip index)."""
    scored = sum(p.kind == "response" for p in pieces)
    if scored != len(turn_lengths):
        raise RuntimeError(f"the conversation has {scored} scored turn(s) in this template, its cache row "
                           f"{len(turn_lengths)}: the cache and the student do not cut it alike")  # fmt: skip
    out, at, lengths = [], 0, iter(int(n) for n in turn_lengths)
    for p in pieces:
        if p.kind == "text":
            out.append(("ids", token_ids(tokenizer, p.text)))
        elif p.kind == "speech":
            out.append(("clip", clip_of_turn[p.turn]))
        else:
            n = next(lengths)
            out.append(("response", at, at + n))
            at += n
    return out


def flatten(segs: list[Segment], response_ids) -> tuple[list[int], np.ndarray]:
    """An all-token layout as (input ids, positions): ids with the response tokens in their places, and where each
    response token is predicted (the position before it)."""
    ids, pos = [], np.zeros(len(response_ids), dtype=np.int64)
    response = [int(i) for i in response_ids]
    for seg in segs:
        if seg[0] == "ids":
            ids.extend(seg[1])
        else:
            a, b = seg[1], seg[2]
            pos[a:b] = np.arange(len(ids) - 1, len(ids) - 1 + b - a)
            ids.extend(response[a:b])
    return ids, pos


@dataclass(frozen=True)
class Conversation:
    """What a student reads of one example: the conversation as cached (pipeline.chat.to_score), which turns were
    scored (the cache's --turns) and, per clip of the example, the user turn it speaks."""

    messages: list[dict]
    turns: str
    spoken: list[int]  # the user turn of each clip, in the example's clip order

    def transcripts(self, tokenizer) -> list[list[int]]:
        """Per clip, its turn's text and the end of turn (what speech alignment predicts from the speech)."""
        return [token_ids(tokenizer, self.messages[t]["content"]) + [tokenizer.eos_token_id] for t in self.spoken]


class ComposedPrompts:
    """The composed student's inputs: the teacher's template (its backbone is the teacher's LLM) with the text, and
    the stored features of each spoken turn's clip (channel S puts its speech embeddings in the turn's place)."""

    kind = "composed"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def example_inputs(self, conv: Conversation, row: dict, clips: list) -> dict:
        tok = self.tokenizer
        text = layout(segments(tok, conv.messages, conv.turns), tok, row["turn_lengths"])
        text_ids, text_pos = flatten(text, row["token_ids"])
        out = {"text_ids": text_ids, "text_pos": text_pos, "transcripts": conv.transcripts(tok)}
        if clips:
            order = {t: j for j, t in enumerate(conv.spoken)}
            out.update(speech_segments=layout(segments(tok, conv.messages, conv.turns, spoken=conv.spoken), tok,
                                              row["turn_lengths"], order), clips=clips)  # fmt: skip
        return out


class SpeechLLMPrompts:
    """A pretrained speech LLM's inputs: its own chat template with the typed turns (channel T), and with an audio
    part in each spoken turn's place, whose placeholder its processor expands to the clip's length while its
    feature extractor computes the clip's features from the waveform (channel S): the model's own audio path,
    exactly as at inference."""

    kind = "hf"

    def __init__(self, processor):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.audio_token = getattr(processor, "audio_token", None) or "<|AUDIO|>"

    def example_inputs(self, conv: Conversation, row: dict, waves: list) -> dict:
        tok, proc = self.tokenizer, self.processor
        text = layout(segments(proc, conv.messages, conv.turns, parts=True), tok, row["turn_lengths"])
        text_ids, text_pos = flatten(text, row["token_ids"])
        out = {"text_ids": text_ids, "text_pos": text_pos, "transcripts": conv.transcripts(tok)}
        if not waves:
            return out
        pieces = segments(proc, conv.messages, conv.turns, spoken=conv.spoken, parts=True)
        segs, feats, masks, heard = [], [], [], 0
        for seg, piece in zip(layout(pieces, tok, row["turn_lengths"]), pieces):
            n_audio = piece.text.count(self.audio_token) if piece.kind == "text" else 0
            if not n_audio:
                segs.append(seg)
                continue
            enc = proc(text=piece.text, audio=list(waves[heard : heard + n_audio]), sampling_rate=16_000,
                       return_tensors="np")  # fmt: skip
            heard += n_audio
            segs.append(("ids", enc["input_ids"][0].tolist()))
            feats.extend(enc["input_features"])
            masks.extend(enc["feature_attention_mask"])
        if heard != len(waves):
            raise RuntimeError(f"the student's template holds {heard} audio part(s) for {len(waves)} spoken turn(s)")
        speech_ids, speech_pos = flatten(segs, row["token_ids"])
        out.update(speech_ids=speech_ids, speech_pos=speech_pos, input_features=feats, feature_mask=masks)
        return out


@dataclass
class Example:
    sample_id: str
    rendition: str | None
    text_ids: list[int]  # channel T: the conversation as text, the cached response tokens in the scored turns
    text_pos: np.ndarray  # (n,) where in text_ids each response token is predicted
    transcripts: list[list[int]]  # per clip: its turn's text + end of turn (speech alignment target)
    response_ids: np.ndarray  # (n,) every scored turn's cached tokens, in order
    clips: list[np.ndarray] = field(default_factory=list)  # composed: each spoken turn's features (frames, n_mels)
    speech_segments: list[Segment] | None = None  # composed channel S: the conversation with the clips in place
    topk_ids: np.ndarray | None = None  # (n, k); None when the targets were not decoded (alignment)
    topk_logprobs: np.ndarray | None = None  # (n, k)
    tail_logmass: np.ndarray | None = None  # (n,)
    draw_ids: np.ndarray | None = None  # (n, m) a sampled cache's distinct drawn ids per position (instead of top-k)
    draw_counts: np.ndarray | None = None  # (n, m) how often each was drawn (0: padding)
    speech_ids: list[int] | None = None  # channel S (a speech LLM): its template, audio placeholders expanded
    speech_pos: np.ndarray | None = None  # (n,) where in speech_ids each response token is predicted
    input_features: list[np.ndarray] | None = None  # per clip (n_mels, frames): its processor's features
    feature_mask: list[np.ndarray] | None = None  # per clip (frames,): which of those frames are the clip's
    dropped_targets: int = 0  # target entries dropped (ids that mean other tokens to the student: student.vocab)


@dataclass
class JoinReport:
    examples: int = 0
    samples: int = 0
    cache_rows_in_split: int = 0
    missing_features: list[str] = field(default_factory=list)  # cached, but no speech features
    missing_cache: list[str] = field(default_factory=list)  # in the split, but not cached
    stale: list[str] = field(default_factory=list)  # cached, but the sample changed since: skipped

    def summary(self) -> str:
        text = (
            f"{self.examples} examples from {self.samples} samples; {len(self.missing_cache)} samples of the split "
            f"have no cache row, {len(self.missing_features)} cached samples have no speech features"
        )
        if self.stale:
            text += (f"; {len(self.stale)} cache rows are stale (their sample changed after caching: skipped; "
                     f"re-run the teacher on this cache to re-score them)")  # fmt: skip
        return text


class StudentData:
    """The examples of one split, one per (cached sample, speech rendition), without loading them.

    Holds an index: per example, where its cache row (shard, row group, row) and its speech clip (a position in the
    run's speech store, student.inputs.SpeechIndex) are, in cache storage order. Decoded targets and features exist
    only for the examples being read (`example(i)`); cache and features are read a row group at a time, the most
    recent ones kept per process (CacheReader, FeatureStore).
    """

    def __init__(self, inputs: RunInputs, tokenizer, split: str = "train", prompts=None):
        """`prompts`: what a prompt becomes for the student (ComposedPrompts over `tokenizer` by default)."""
        self.inputs, self.reader, self.samples = inputs, inputs.reader, inputs.samples
        self.vocab = check_tokenizer(self.reader, tokenizer)
        self.dropped = np.array(sorted(self.vocab.dropped), dtype=np.int64)
        self.tokenizer = tokenizer
        self.prompts = prompts or ComposedPrompts(tokenizer)
        speech = inputs.speech
        self.features = speech.store if speech is not None else None
        ids = inputs.samples.split(split)
        in_split = set(ids)
        # what each sample's cache row must have scored; a row whose hash differs is stale (the sample was
        # edited after caching) and is skipped and counted, never trained on
        generation = self.reader.fingerprint.get("generation")
        self.responses = self.reader.fingerprint.get("responses") or "dataset"
        self.turns = self.reader.fingerprint.get("turns") or "last"
        # per cache row in the split: (block, shard, group, row); per example: cache row index, its clips (each
        # spoken turn's position in the speech store)
        rows, ex_row, ex_clip = [], [], []
        self.row_sample_ids: list[str] = []
        report = JoinReport(samples=len(ids))
        seen = set()
        for block, (s, g, sids, hashes) in enumerate(self.reader.row_groups()):
            for r, (sid, digest) in enumerate(zip(sids, hashes)):
                if sid not in in_split:
                    continue
                seen.add(sid)
                report.cache_rows_in_split += 1
                if digest != self.samples.content_sha256(sid, generation):
                    report.stale.append(sid)
                    continue
                clips = speech.clips(sid) if speech is not None else [()]
                if not clips:
                    report.missing_features.append(sid)
                    continue
                row_index = len(rows)
                rows.append((block, s, g, r))
                self.row_sample_ids.append(sid)
                for group in clips:
                    ex_row.append(row_index)
                    ex_clip.append(group)
        report.missing_cache = sorted(in_split - seen)
        self.rows = np.array(rows, dtype=np.int64).reshape(-1, 4)  # block, shard, group, row
        self.ex_row = np.array(ex_row, dtype=np.int64)
        self.ex_clip: list[tuple[tuple[int, int], ...]] = ex_clip  # per example: ((turn, store position), ...)
        report.examples = len(self.ex_row)
        self.report = report

    @classmethod
    def open(cls, cache: Path | str | CacheReader, tokenizer, samples_dir: Path | None = None,
             features_dir: Path | None = None, split: str = "train", need_speech: bool = True,
             prompts=None) -> "StudentData":  # fmt: skip
        """A split's examples straight from a cache directory (the inputs it names unless given)."""
        speech = "audio" if prompts is not None and prompts.kind == "hf" else "features"
        return cls(RunInputs.open(cache, samples_dir, features_dir, need_speech, speech=speech), tokenizer, split,
                   prompts)  # fmt: skip

    @property
    def samples_dir(self) -> Path:
        return self.inputs.samples_dir

    @property
    def features_dir(self) -> Path:
        return self.inputs.features_dir

    def __len__(self) -> int:
        return len(self.ex_row)

    def block_of(self) -> np.ndarray:
        """Per example, the cache row group (block) it is stored in: the unit of shuffling and reading."""
        return self.rows[self.ex_row, 0]

    def sample_id(self, i: int) -> str:
        return self.row_sample_ids[self.ex_row[i]]

    def example(self, i: int, targets: bool = True) -> Example:
        """Example i, read and decoded now (targets=False: skip decoding the top-k, e.g. while aligning)."""
        _, s, g, r = self.rows[self.ex_row[i]].tolist()
        row = self.reader.decode_table_row(self.reader.read_row_group(s, g), r, targets=targets)
        sid = row["sample_id"]
        group = self.ex_clip[i]
        messages = to_score(conversation(self.samples.row(sid)), self.responses)
        conv = Conversation(messages, self.turns, [t for t, _ in group] or self.last_user(messages))
        clips = [self.features.read(pos) for _, pos in group] if self.features is not None else []
        rendition = self.features.renditions[group[0][1]] if group and self.features is not None else None
        made = self.prompts.example_inputs(conv, row, clips)
        ex = Example(sid, rendition, made["text_ids"], made["text_pos"], made["transcripts"], row["token_ids"],
                     made.get("clips", []), made.get("speech_segments"), row.get("topk_ids"),
                     row.get("topk_logprobs"), row.get("tail_logmass"), row.get("draw_ids"), row.get("draw_counts"),
                     made.get("speech_ids"), made.get("speech_pos"), made.get("input_features"),
                     made.get("feature_mask"))  # fmt: skip
        if len(self.dropped):
            self._drop_targets(ex)
        return ex

    @staticmethod
    def last_user(messages: list[dict]) -> list[int]:
        """Without speech: the turn a transcript is made of (the last user turn)."""
        return [max(i for i, m in enumerate(messages) if m["role"] == "user")]

    def _drop_targets(self, ex: Example) -> None:
        """Ids the student reads as other tokens (student.vocab) are never trained toward: a cached response token
        that is one is refused; in the targets their probability is set to 0 (the losses renormalize) and counted."""
        bad = np.isin(ex.response_ids, self.dropped)
        if bad.any():
            tid = int(ex.response_ids[np.flatnonzero(bad)[0]])
            raise TokenizerMismatch(f"sample {ex.sample_id!r}: its cached response has token id {tid}, "
                                    f"{self.vocab.dropped[tid][0]!r} to the teacher but {self.vocab.dropped[tid][1]!r} "
                                    f"to the student; a student cannot be trained toward it: use a student whose "
                                    f"tokenizer gives that id the teacher's token")  # fmt: skip
        if ex.topk_ids is not None:
            hit = np.isin(ex.topk_ids, self.dropped)
            ex.topk_logprobs = np.where(hit, -np.inf, ex.topk_logprobs).astype(np.float32)
            ex.dropped_targets = int(hit.sum())
        if ex.draw_ids is not None:
            hit = np.isin(ex.draw_ids, self.dropped) & (ex.draw_counts > 0)
            ex.draw_counts = np.where(hit, 0, ex.draw_counts)
            ex.dropped_targets = int(hit.sum())


def load_examples(
    cache_dir: Path, tokenizer, samples_dir: Path | None = None, features_dir: Path | None = None,
    split: str = "train", need_speech: bool = True,
) -> tuple[list[Example], JoinReport]:  # fmt: skip
    """Every example of one split, decoded, in memory: for tests and small sets (training streams)."""
    data = StudentData.open(cache_dir, tokenizer, samples_dir, features_dir, split, need_speech)
    return [data.example(i) for i in range(len(data))], data.report


class BlockShuffleSampler:
    """Deterministic, resumable order over a subset of examples: the global batch of `step` is a function
    of (seed, step) only.

    Each epoch permutes the cache row groups (blocks) the examples are stored in, cuts that order into
    windows of `window` blocks and shuffles the examples within each window: batches read a bounded set of
    row groups at a time (memory does not grow with the cache), while the order still mixes `window` random
    blocks. With window >= the number of blocks it is a full shuffle. Epochs drop their last partial batch.
    """

    def __init__(self, examples: np.ndarray, blocks: np.ndarray, batch_size: int, seed: int, window: int = 8):
        self.examples = np.asarray(examples, dtype=np.int64)  # example indices of the subset
        self.blocks = np.asarray(blocks, dtype=np.int64)  # their blocks
        self.batch_size, self.seed, self.window = batch_size, seed, window
        if len(self.examples) < batch_size:
            raise ConfigError(f"--batch-size {batch_size} is larger than the {len(self.examples)} examples to "
                              f"train on; use a smaller batch")  # fmt: skip
        self.per_epoch = len(self.examples) // batch_size
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            uniq = np.unique(self.blocks)
            perm = rng.permutation(uniq)
            rank = np.empty(perm.max() + 1, dtype=np.int64)
            rank[perm] = np.arange(len(perm))
            window_of = rank[self.blocks] // self.window
            noise = rng.random(len(self.examples))
            self._order = self.examples[np.lexsort((noise, window_of))]
            self._epoch = epoch
        return self._order

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        return self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]


def shard_of_batch(indices: np.ndarray, rank: int, world_size: int, grad_accum: int) -> list[np.ndarray]:
    """This rank's share of a global batch, split into its micro-batches: disjoint across ranks, and their
    union over ranks and micro-batches is the global batch."""
    per_rank = len(indices) // world_size
    mine = indices[rank * per_rank : (rank + 1) * per_rank]
    return np.array_split(mine, grad_accum)


class StepBatches(torch.utils.data.Dataset):
    """Item `step` = this rank's micro-batches of that optimizer step, collated (for a DataLoader with
    batch_size=None and a sampler over the steps to run; workers read and decode ahead of training)."""

    def __init__(self, data: StudentData, phases: list[tuple[int, BlockShuffleSampler]], pad_id: int,
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, targets_from: int = 0):  # fmt: skip
        self.data, self.phases, self.pad_id = data, phases, pad_id  # phases: (first step, sampler), ascending
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.targets_from = targets_from  # steps before this need no decoded top-k (alignment)

    def sampler_at(self, step: int) -> tuple[int, BlockShuffleSampler]:
        first, sampler = self.phases[0]
        for start, s in self.phases:
            if step >= start:
                first, sampler = start, s
        return first, sampler

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int) -> list[dict[str, torch.Tensor]]:
        first, sampler = self.sampler_at(step)
        targets = step >= self.targets_from
        micro = shard_of_batch(sampler.indices(step - first), self.rank, self.world_size, self.grad_accum)
        return [collate([self.data.example(int(i), targets=targets) for i in part], self.pad_id) for part in micro]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """The student's one padding contract: a batch of examples as padded tensors.

    Padded response positions have mask False, response id `pad_id`, top-k ids 0, top-k logprobs 0 and tail
    log-mass 0 — finite values, so nothing downstream can turn them into NaN; every loss masks them out
    before it multiplies (student.losses). Sampled targets (draw_ids, draw_counts) are padded to the batch's most
    distinct ids at a position with id 0 and count 0: a zero-count slot weighs nothing.
    """
    B = len(examples)
    n = max(len(e.response_ids) for e in examples)
    batch = {
        "response_ids": torch.full((B, n), pad_id, dtype=torch.long),
        "mask": torch.zeros(B, n, dtype=torch.bool),
    }
    has_targets = examples[0].topk_ids is not None
    if has_targets:
        k = examples[0].topk_ids.shape[1]
        batch.update(topk_ids=torch.zeros(B, n, k, dtype=torch.long), topk_logprobs=torch.zeros(B, n, k),
                     tail_logmass=torch.zeros(B, n))  # fmt: skip
    has_draws = examples[0].draw_ids is not None
    if has_draws:
        width = max(e.draw_ids.shape[1] for e in examples)
        batch.update(draw_ids=torch.zeros(B, n, width, dtype=torch.long), draw_counts=torch.zeros(B, n, width))
    for b, e in enumerate(examples):
        m = len(e.response_ids)
        batch["response_ids"][b, :m] = torch.from_numpy(e.response_ids)
        batch["mask"][b, :m] = True
        if has_targets:
            batch["topk_ids"][b, :m] = torch.from_numpy(e.topk_ids)
            batch["topk_logprobs"][b, :m] = torch.from_numpy(e.topk_logprobs)
            batch["tail_logmass"][b, :m] = torch.from_numpy(e.tail_logmass)
        if has_draws:
            batch["draw_ids"][b, :m, : e.draw_ids.shape[1]] = torch.from_numpy(e.draw_ids)
            batch["draw_counts"][b, :m, : e.draw_counts.shape[1]] = torch.from_numpy(e.draw_counts.astype(np.float32))
    # channel T: the conversation, right-padded; text_response_pos[b, t] is where response token t is predicted
    batch.update(pad_ids([e.text_ids for e in examples], [e.text_pos for e in examples], n, pad_id, "text"))
    if examples[0].speech_ids is not None:  # channel S of a speech LLM: its own ids and its processor's features
        batch.update(speech_llm_inputs(examples, n, pad_id))
    batch["dropped_targets"] = torch.tensor(sum(e.dropped_targets for e in examples), dtype=torch.long)
    # per clip (every example's, in order): its transcript; without speech, one per example
    transcripts = [t for e in examples for t in e.transcripts]
    m = max(len(t) for t in transcripts)
    batch["transcript_ids"] = torch.full((len(transcripts), m), pad_id, dtype=torch.long)
    batch["transcript_mask"] = torch.zeros(len(transcripts), m, dtype=torch.bool)
    for c, t in enumerate(transcripts):
        batch["transcript_ids"][c, : len(t)] = torch.tensor(t)
        batch["transcript_mask"][c, : len(t)] = True
    if examples[0].clips:
        batch.update(pad_speech([c for e in examples for c in e.clips]))
        # each example's channel S layout, its clips numbered over the batch
        first, layouts = 0, []
        for e in examples:
            layouts.append([("clip", first + seg[1]) if seg[0] == "clip" else seg for seg in e.speech_segments])
            first += len(e.clips)
        batch["speech_segments"] = layouts
    return batch


def pad_ids(rows: list[list[int]], positions: list[np.ndarray], n: int, pad_id: int, name: str) -> dict:
    """Token id rows right-padded as `<name>_ids`, `<name>_attention`, and `<name>_response_pos` (B, n): where
    each row's response token t is predicted (0 past its response)."""
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, n, dtype=torch.long)
    for b, (r, p) in enumerate(zip(rows, positions)):
        ids[b, : len(r)] = torch.tensor(r)
        attention[b, : len(r)] = 1
        pos[b, : len(p)] = torch.from_numpy(np.asarray(p, dtype=np.int64))
    return {f"{name}_ids": ids, f"{name}_attention": attention, f"{name}_response_pos": pos}


def speech_llm_inputs(examples: list[Example], n: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A speech LLM's channel S for a batch: its ids (audio placeholders expanded, the response in place),
    right-padded, `speech_response_pos[b, t]` where response token t is predicted; its processor's features of
    every clip of the batch (in order: the order the placeholders come in), padded in time with their frame mask."""
    out = pad_ids([e.speech_ids for e in examples], [e.speech_pos for e in examples], n, pad_id, "speech")
    feats = [f for e in examples for f in e.input_features]
    masks = [m for e in examples for m in e.feature_mask]
    frames = max(f.shape[-1] for f in feats)
    x = torch.zeros(len(feats), feats[0].shape[0], frames)
    mask = torch.zeros(len(feats), frames, dtype=torch.long)
    for c, (f, m) in enumerate(zip(feats, masks)):
        x[c, :, : f.shape[-1]] = torch.from_numpy(np.asarray(f, dtype=np.float32))
        mask[c, : m.shape[-1]] = torch.from_numpy(np.asarray(m, dtype=np.int64))
    out.update(input_features=x, feature_attention_mask=mask)
    return out


def pad_speech(clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Speech features (frames, n_mels) of a batch's clips, zero-padded in time, with their lengths."""
    T = max(c.shape[0] for c in clips)
    speech = torch.zeros(len(clips), T, clips[0].shape[1])
    for b, c in enumerate(clips):
        speech[b, : c.shape[0]] = torch.from_numpy(c.astype(np.float32))
    return {"speech": speech, "speech_lengths": torch.tensor([c.shape[0] for c in clips])}


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a (pinned, on CUDA) batch's tensors to the device without blocking the host (its layouts stay)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _pad_rows(rows: list[torch.Tensor], positions: list[torch.Tensor], like: torch.Tensor):
    L = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), L, like.shape[-1], device=like.device, dtype=like.dtype)
    attention = torch.zeros(len(rows), L, dtype=torch.long, device=like.device)
    for b, r in enumerate(rows):
        embeds[b, : r.shape[0]] = r
        attention[b, : r.shape[0]] = 1
    return embeds, attention, torch.stack(positions).to(like.device)


def speech_inputs(model, batch: dict, encoded=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel S embeddings of a batch: each example's conversation (its `speech_segments`) with the speech
    embeddings of each spoken turn's clip in its place and the cached response tokens in theirs, right-padded.
    `encoded`: the encoder's output for batch["speech"], when the caller has it already. Returns (embeds (B, L, H),
    attention (B, L), target_pos (B, n)): logits at target_pos[b, t] predict response token t."""
    speech, lengths = model.speech_embeddings(batch["speech"], batch["speech_lengths"], encoded)
    embed, device = model.embed, speech.device
    resp = embed(batch["response_ids"])
    n = batch["response_ids"].shape[1]
    rows, positions = [], []
    for b, segs in enumerate(batch["speech_segments"]):
        parts, pos, at = [], torch.zeros(n, dtype=torch.long), 0
        for seg in segs:
            if seg[0] == "ids":
                part = embed(torch.tensor(seg[1], dtype=torch.long, device=device))
            elif seg[0] == "clip":
                part = speech[seg[1], : lengths[seg[1]]]
            else:
                a, z = seg[1], seg[2]
                part = resp[b, a:z]
                pos[a:z] = torch.arange(at - 1, at - 1 + z - a)
            parts.append(part)
            at += part.shape[0]
        rows.append(torch.cat(parts))
        positions.append(pos)
    return _pad_rows(rows, positions, speech)


def transcript_inputs(model, batch: dict, encoded=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speech alignment's inputs: per clip, its speech embeddings then its transcript's tokens, right-padded; (embeds,
    attention, target_pos (clips, m)): logits at target_pos[c, t] predict transcript token t."""
    speech, lengths = model.speech_embeddings(batch["speech"], batch["speech_lengths"], encoded)
    text = model.embed(batch["transcript_ids"])
    m = batch["transcript_ids"].shape[1]
    rows, positions = [], []
    for c in range(speech.shape[0]):
        k, start = int(batch["transcript_mask"][c].sum()), int(lengths[c])
        rows.append(torch.cat([speech[c, :start], text[c, :k]]))
        pos = torch.zeros(m, dtype=torch.long)
        pos[:k] = torch.arange(start - 1, start - 1 + k)
        positions.append(pos)
    return _pad_rows(rows, positions, speech)


def gather_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits at (B, n) positions -> (B, n, V)."""
    return torch.gather(logits, 1, positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
