"""Train the speech student from the cached teacher logits. The teacher is never run here.

    python student/train.py --logits data/cache
    python student/train.py --logits data/cache --alpha 0 --beta 0 --ce-channels S   # CE-only baseline
    python student/train.py --logits data/cache --resume

First `--align-steps` steps align the speech encoder+adapter to the frozen
backbone by transcription (from the speech alone, predict the prompt's tokens),
as speech LLMs are built before their fine-tuning. Then the loss (the paper's
recipe by default: forward KL, tau 2, both channels, CE on the cached responses
of both channels):

    total = alpha * tau^2 * KD(T->T) + beta * tau^2 * KD(S->T) + gamma * sum(CE over --ce-channels)

Samples and speech features are found through the cache manifest, the backbone
is the teacher named there (the student starts as a copy of the text LLM),
unless given. Writes <out>/metrics.csv, eval.csv, loss.png, checkpoint.pt and,
at the end, <out>/final (backbone in HF format + encoder/adapter + config).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.cache import CacheReader
from pipeline.features import feature_config_of
from pipeline.samples import load_samples
from student.data import BatchSampler, SpeechTemplate, collate, gather_positions, load_examples, speech_inputs
from student.evaluate import eval_set, evaluate_student, evaluate_teacher, format_report, inputs_from_manifest
from student.losses import KD_LOSSES, response_ce
from student.model import SpeechLLM, StudentConfig


@dataclass
class TrainConfig:
    logits: str = "data/cache"
    out: str = "data/runs/student"
    samples: str | None = None  # default: from the cache manifest
    features: str | None = None  # default: from the cache manifest
    backbone: str | None = None  # default: the teacher named in the cache manifest
    encoder: str = "conv-transformer"
    steps: int = 600
    align_steps: int = 300  # first: encoder+adapter learn to transcribe the spoken prompt (backbone frozen)
    ctc_weight: float = 1.0  # CTC on the encoder frames during alignment (0: none, and no CTC head)
    batch_size: int = 32
    lr: float = 1e-3  # encoder + adapter
    backbone_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.01
    kd: str = "forward_kl"  # forward_kl | forward_kl_tail | reverse_kl
    tau: float = 2.0
    alpha: float = 0.5  # T->T KD weight (lambda in the paper)
    beta: float = 0.5  # S->T KD weight
    gamma: float = 1.0  # CE weight
    ce_channels: str = "T,S"
    # Fine-tune on the samples of only this fraction of the groups (meta key `finetune_group`, e.g. the toy
    # world's entities); alignment still hears every training prompt. Models the paper's setting: speech
    # fine-tuning data that covers part of what the model knows, evaluated on all of it.
    finetune_fraction: float = 1.0
    finetune_group: str = "entity"
    freeze_backbone: bool = False
    eval_every: int = 200
    eval_limit: int = 300  # eval questions during training (the final eval uses all)
    save_every: int = 200
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None  # train this many steps now (checkpointed), --resume later


def channel_losses(model, template, batch, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """KD and CE terms of each channel the config uses."""
    kd = KD_LOSSES[cfg.kd]
    ce_channels = {c.strip() for c in cfg.ce_channels.split(",") if c.strip()}
    out = {}
    targets = dict(teacher_ids=batch["topk_ids"], teacher_logprobs=batch["topk_logprobs"], mask=batch["mask"],
                   tau=cfg.tau, tail_logmass=batch["tail_logmass"])  # fmt: skip
    if cfg.alpha > 0 or "T" in ce_channels:
        logits = model.forward_embeds(model.embed(batch["text_ids"]), batch["text_attention"])
        logits = gather_positions(logits, batch["text_response_pos"])
        if cfg.alpha > 0:
            out["kd_T"] = kd(logits, **targets)
        if "T" in ce_channels:
            out["ce_T"] = response_ce(logits, batch["response_ids"], batch["mask"])
    if cfg.beta > 0 or "S" in ce_channels:
        embeds, attention, pos = speech_inputs(model, template, batch)
        logits = gather_positions(model.forward_embeds(embeds, attention), pos)
        if cfg.beta > 0:
            out["kd_S"] = kd(logits, **targets)
        if "S" in ce_channels:
            out["ce_S"] = response_ce(logits, batch["response_ids"], batch["mask"])
    return out


def alignment_loss(model, batch, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Speech alignment: from the speech alone, predict the prompt's own tokens, through the backbone
    (`align`) and, with --ctc-weight > 0, straight from the encoder frames by CTC (`ctc`)."""
    encoded = model.encoder(batch["speech"], batch["speech_lengths"])
    embeds, attention, pos = speech_inputs(model, SpeechTemplate([], []), batch, target="transcript", encoded=encoded)
    logits = gather_positions(model.forward_embeds(embeds, attention), pos)
    parts = {"align": response_ce(logits, batch["transcript_ids"], batch["transcript_mask"])}
    if cfg.ctc_weight > 0:
        # the transcript without its end-of-turn token
        parts["ctc"] = model.ctc_loss(encoded, batch["transcript_ids"], batch["transcript_mask"].sum(1) - 1)
    return parts


def total_loss(parts: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    t2 = cfg.tau**2
    total = torch.zeros(())
    if "kd_T" in parts:
        total = total + cfg.alpha * t2 * parts["kd_T"]
    if "kd_S" in parts:
        total = total + cfg.beta * t2 * parts["kd_S"]
    for name in ("ce_T", "ce_S"):
        if name in parts:
            total = total + cfg.gamma * parts[name]
    if "align" in parts:
        total = total + parts["align"]
    if "ctc" in parts:
        total = total + cfg.ctc_weight * parts["ctc"]
    return total


def finetune_groups(samples_dir: Path, cfg: TrainConfig) -> tuple[dict[str, str], set[str]] | None:
    """({sample_id: group} over all splits, the groups fine-tuned on), or None when fine-tuning on everything.

    A group is the value of meta key `cfg.finetune_group` (a sample without it is its own group); a seeded
    `cfg.finetune_fraction` of the training split's groups is kept.
    """
    if cfg.finetune_fraction >= 1.0:
        return None
    if not 0.0 < cfg.finetune_fraction:
        raise ValueError(f"--finetune-fraction must be in (0, 1], got {cfg.finetune_fraction}")
    rows = load_samples(samples_dir).to_pylist()
    group = {r["sample_id"]: str(json.loads(r["meta"] or "{}").get(cfg.finetune_group, r["sample_id"])) for r in rows}
    groups = sorted({group[r["sample_id"]] for r in rows if r["split"] == "train"})
    random.Random(cfg.seed).shuffle(groups)
    return group, set(groups[: max(1, round(cfg.finetune_fraction * len(groups)))])


def build(cfg: TrainConfig):
    """Cache reader, tokenizer, training examples + join report, the student, and the samples/features dirs
    (from the cache manifest unless given)."""
    from transformers import AutoTokenizer

    reader = CacheReader(cfg.logits)
    backbone = cfg.backbone or reader.fingerprint["model"]
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    samples_dir, features_dir = inputs_from_manifest(reader, cfg.samples, cfg.features)
    kind = feature_config_of(features_dir).kind
    if cfg.encoder != "conv-transformer" and kind != "whisper":
        raise ValueError(
            f"--encoder {cfg.encoder} takes Whisper log-mel features but {features_dir} holds {kind!r} features: "
            f"run `python -m pipeline.features --kind whisper --out data/features_whisper` and pass "
            f"--features data/features_whisper"
        )
    examples, report = load_examples(Path(cfg.logits), tokenizer, samples_dir, features_dir, split="train")
    if not examples:
        raise ValueError(f"no training examples: {report.summary()}")
    scfg = StudentConfig(backbone=backbone, encoder=cfg.encoder, n_mels=examples[0].speech.shape[1],
                         train_backbone=not cfg.freeze_backbone, ctc=cfg.ctc_weight > 0)  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = SpeechLLM(scfg)
    return reader, tokenizer, examples, report, model, (samples_dir, features_dir)


def make_optimizer(model: SpeechLLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for p in model.speech_parameters() if p.requires_grad], "lr": cfg.lr},
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": cfg.backbone_lr},
    ]
    groups[0]["name"], groups[1]["name"] = "speech", "backbone"
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay, restarted for each phase (alignment, then fine-tuning), so a
    longer alignment does not leave the fine-tuning at the tail of one long decay."""
    start, end = (0, cfg.align_steps) if step < cfg.align_steps else (cfg.align_steps, cfg.steps)
    i, n = step - start, max(1, end - start)
    warmup = min(cfg.warmup, n)
    if i < warmup:
        return (i + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, n - warmup)))


def save_checkpoint(path: Path, model, optim, step: int, cfg: TrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": step, "config": asdict(cfg),
                "torch_rng": torch.get_rng_state()}, tmp)  # fmt: skip
    tmp.replace(path)


def plot(metrics_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in ("loss", "align", "ctc", "kd_T", "kd_S", "ce_T", "ce_S"):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("student training losses")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


METRIC_FIELDS = ["step", "loss", "align", "ctc", "kd_T", "kd_S", "ce_T", "ce_S", "lr", "data_s", "step_s"]


def train(cfg: TrainConfig, progress: bool = True, final_eval: bool = True) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    reader, tokenizer, examples, report, model, (samples_dir, features_dir) = build(cfg)
    print(f"student data: {report.summary()}")
    template = SpeechTemplate.from_tokenizer(tokenizer)
    optim = make_optimizer(model, cfg)
    sampler = BatchSampler(len(examples), cfg.batch_size, cfg.seed)
    grouping = finetune_groups(samples_dir, cfg)
    ft_examples = list(range(len(examples)))
    if grouping:
        group, kept = grouping
        ft_examples = [i for i, e in enumerate(examples) if group[e.sample_id] in kept]
    ft_sampler = BatchSampler(len(ft_examples), cfg.batch_size, cfg.seed)
    if len(ft_examples) < len(examples):
        print(f"fine-tuning on {len(ft_examples)} of {len(examples)} examples "
              f"({cfg.finetune_fraction:g} of the {cfg.finetune_group!r} groups); alignment on all")  # fmt: skip
    start = 0
    ckpt = out / "checkpoint.pt"
    if cfg.resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        print(f"resumed from {ckpt} at step {start}")
    elif (out / "metrics.csv").exists():
        (out / "metrics.csv").unlink()
    eval_rows = eval_set(samples_dir, features_dir, limit=cfg.eval_limit) if cfg.eval_every else []
    metrics_fh = open(out / "metrics.csv", "a", newline="")
    writer = csv.DictWriter(metrics_fh, METRIC_FIELDS)
    if metrics_fh.tell() == 0:
        writer.writeheader()
    data_time = step_time = 0.0
    bar = tqdm(range(start, cfg.steps), desc="student", unit="step", disable=not progress, initial=start,
               total=cfg.steps)  # fmt: skip
    last = {}
    stop_at = min(cfg.steps, start + cfg.stop_after) if cfg.stop_after else cfg.steps
    for step in bar:
        if step >= stop_at:
            save_checkpoint(ckpt, model, optim, step, cfg)
            metrics_fh.close()
            print(f"stopped after step {step} (--stop-after); continue with --resume")
            return {"stopped_at": step}
        t0 = time.perf_counter()
        aligning = step < cfg.align_steps
        chosen = sampler.indices(step) if aligning else [ft_examples[i] for i in ft_sampler.indices(step)]
        batch = collate([examples[i] for i in chosen], tokenizer.pad_token_id or 0)
        t1 = time.perf_counter()
        model.train()
        for g in optim.param_groups:
            # While aligning speech the backbone stays as the text LLM it was (lr 0).
            frozen = aligning and g["name"] == "backbone"
            g["lr"] = 0.0 if frozen else g["base_lr"] * lr_scale(step, cfg)
        parts = alignment_loss(model, batch, cfg) if aligning else channel_losses(model, template, batch, cfg)
        loss = total_loss(parts, cfg)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        t2 = time.perf_counter()
        data_time += t1 - t0
        step_time += t2 - t0
        last = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                "lr": optim.param_groups[-1]["lr"], "data_s": t1 - t0, "step_s": t2 - t0}  # fmt: skip
        writer.writerow(last)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt, model, optim, done, cfg)
        if cfg.eval_every and eval_rows and done % cfg.eval_every == 0 and done != cfg.steps:
            r = evaluate_student(model, tokenizer, eval_rows)
            with open(out / "eval.csv", "a") as fh:
                fh.write(f"{done},{r['student_text_accuracy']:.4f},{r['student_speech_accuracy']:.4f}\n")
            tqdm.write(f"step {done}: student text {r['student_text_accuracy']:.1%}, "
                       f"speech {r['student_speech_accuracy']:.1%} (on {r['n_eval']})")  # fmt: skip
    metrics_fh.close()
    plot(out / "metrics.csv", out / "loss.png")
    model.save(out / "final", tokenizer)
    steps_run = cfg.steps - start
    result = {"final_loss": last.get("loss"), "steps": cfg.steps,
              "data_fraction": data_time / step_time if step_time else 0.0, "examples": len(examples),
              "finetune_examples": len(ft_examples)}  # fmt: skip
    if final_eval:
        rows = eval_set(samples_dir, features_dir)
        subsets = None
        if grouping:
            finetuned = {r["sample_id"] for r in rows if group[r["sample_id"]] in kept}
            subsets = {"finetuned": finetuned, "not_finetuned": {r["sample_id"] for r in rows} - finetuned}
        result.update(evaluate_student(model, tokenizer, rows, subsets=subsets))
        result["teacher_text_accuracy"] = evaluate_teacher(reader.fingerprint["model"], rows)
        result["forgetting"] = result["teacher_text_accuracy"] - result["student_text_accuracy"]
        print(format_report(result))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if steps_run:
        print(f"data loading: {result['data_fraction']:.1%} of step time; saved {out / 'final'}")
    return result


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true")
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
