"""The embedded default teacher: a tokenizer and a small Llama trained on the toy world.

    python -m toy.teacher            # builds data/models/teacher if missing

Trains a byte-level BPE tokenizer (with a chat template) on the train split,
then a small Llama-architecture causal LM on the train samples (loss on the
response tokens), until greedy answers to the eval split reach the target
exact-match accuracy. Saved in Hugging Face format, so transformers and vLLM
load it from the local path; everything downstream takes any HF model path or
id in its place.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import cpu_isa, schemas
from pipeline.config import config_from_args, opt, parse_args
from pipeline.errors import cli
from pipeline.chat import encode_pair, encode_prompt, exact_match
from pipeline.samples import load_samples

BUILD_REPORT = "speechkd_teacher.json"
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)


@dataclass
class ToyTeacherConfig:
    """The toy teacher's build: tokenizer size, model size, training budget."""

    vocab_size: int = opt(1024, "byte-level BPE vocabulary")
    hidden_size: int = opt(128, "model width")
    intermediate_size: int = opt(384, "MLP width")
    num_layers: int = opt(4, "transformer layers")
    num_heads: int = opt(2, "attention heads (head_dim = hidden / heads)")
    max_position_embeddings: int = opt(256, "context length")
    lr: float = opt(3e-3, "peak learning rate")
    batch_size: int = opt(32, "examples per step")
    max_epochs: int = opt(60, "epochs at most")
    eval_every: int = opt(5, "evaluate every N epochs")
    target_accuracy: float = opt(0.95, "stop training once eval exact match reaches this")
    min_accuracy: float = opt(0.90, "the command fails below this")
    max_minutes: float = opt(5.0, "training budget")
    seed: int = opt(0, "seeds the tokenizer's data order, the weights and the batches")
    threads: int = opt(None, "torch threads (default: torch's)", factory=lambda: torch.get_num_threads())


@dataclass
class ToyTeacherBuild:
    """`python -m toy.teacher`: where the build reads and writes."""

    samples: str = opt(str(schemas.SAMPLES_DIR), "samples directory")
    out: str = opt(str(schemas.TEACHER_DIR), "where to save the HF model")
    force: bool = opt(False, "rebuild even if a complete build exists")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", model_max_length=1 << 16
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(tokenizer, cfg: ToyTeacherConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(p) + len(r) for p, r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (p, r) in enumerate(chunk):
            n = len(p) + len(r)
            ids[row, :n] = torch.tensor(p + r)
            labels[row, len(p) : n] = torch.tensor(r)
            mask[row, :n] = 1
        yield ids, mask, labels


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 128) -> list[str]:
    """Greedy responses of a causal LM to chat-templated prompts (transformers)."""
    model.eval()
    tokenizer.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(enc):
            ids[row, width - len(e) :] = torch.tensor(e)
            mask[row, width - len(e) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.extend(tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True))
    return out


def build_teacher(samples_dir: Path, out_dir: Path, cfg: ToyTeacherConfig, progress: bool = True) -> dict:
    """Train tokenizer + model, save both to `out_dir`, return the build report."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    train = load_samples(samples_dir, "train").to_pylist()
    evals = load_samples(samples_dir, "eval").to_pylist()
    if not train:
        raise ValueError(f"no train samples in {samples_dir}: the teacher needs a train split")
    missing = [r["sample_id"] for r in train if not r["response"]]
    if missing:
        raise ValueError(f"train samples without a response cannot train the toy teacher, e.g. {missing[:3]}")

    t0 = time.monotonic()
    # Tokenizer from train text only: held-out eval words split into trained pieces.
    tokenizer = train_tokenizer([r["prompt"] for r in train] + [r["response"] for r in train], cfg.vocab_size)
    examples = []
    for r in train:
        pair = encode_pair(tokenizer, r["prompt"], r["response"])
        examples.append((pair.prompt_ids, pair.response_ids))
    max_response = max(len(e[1]) for e in examples)
    model = make_model(tokenizer, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.max_epochs
    warmup = min(100, total_steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    eval_prompts = [r["prompt"] for r in evals]
    eval_refs = [r["response"] for r in evals]
    accuracy, epoch, step, history = 0.0, 0, 0, []
    bar = tqdm(total=total_steps, desc="teacher", unit="step", disable=not progress)
    stop_reason = f"max_epochs {cfg.max_epochs}"
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        for ids, mask, labels in _batches(examples, cfg.batch_size, tokenizer.pad_token_id, rng):
            for group in optim.param_groups:
                group["lr"] = lr_at(step)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
        out_of_time = time.monotonic() - t0 > cfg.max_minutes * 60
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs or out_of_time:
            if eval_prompts:
                accuracy = exact_match(greedy_answers(model, tokenizer, eval_prompts, max_response + 2), eval_refs)
            history.append({"epoch": epoch, "loss": round(loss.item(), 4), "eval_accuracy": accuracy})
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
            if eval_prompts and accuracy >= cfg.target_accuracy:
                stop_reason = f"reached target accuracy {cfg.target_accuracy}"
                break
            if out_of_time:
                stop_reason = f"time budget {cfg.max_minutes} min"
                break
    bar.close()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "eval_accuracy": accuracy,
        "n_eval": len(evals),
        "n_train": len(train),
        "epochs": epoch,
        "steps": step,
        "seconds": round(time.monotonic() - t0, 1),
        "stop_reason": stop_reason,
        "parameters": n_params,
        "config": asdict(cfg),
        "cpu": cpu_isa.describe(),  # the arithmetic it was built with (pipeline.cpu_isa)
        "history": history,
    }
    # Written last: its presence marks a complete build.
    (out_dir / BUILD_REPORT).write_text(json.dumps(report, indent=2))
    return report


def is_built(out_dir: Path) -> bool:
    return (Path(out_dir) / BUILD_REPORT).exists() and (Path(out_dir) / "config.json").exists()


@cli("toy.teacher")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(ToyTeacherConfig, ToyTeacherBuild, argv=argv, description=__doc__)
    cfg, run = config_from_args(ToyTeacherConfig, args), config_from_args(ToyTeacherBuild, args)
    out = Path(run.out)
    if is_built(out) and not run.force:
        report = json.loads((out / BUILD_REPORT).read_text())
        print(f"teacher: already built at {out} (eval exact match {report['eval_accuracy']:.1%}); --force rebuilds")
        return 0
    report = build_teacher(Path(run.samples), out, cfg)
    print(
        f"teacher: eval exact match {report['eval_accuracy']:.1%} on {report['n_eval']} held-out-template questions "
        f"after {report['epochs']} epochs, {report['seconds']:.0f}s ({report['parameters'] / 1e6:.1f}M params) -> {out}"
    )
    if report["n_eval"] and report["eval_accuracy"] < cfg.min_accuracy:
        print(
            f"teacher: below the minimum {cfg.min_accuracy:.0%} ({report['stop_reason']}); "
            "raise --max-epochs/--max-minutes or the model size",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
