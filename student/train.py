"""Train the speech student from the cached teacher logits. The teacher is never run here.

    python student/train.py --logits data/cache
    python student/train.py --logits data/cache --alpha 0 --beta 0 --ce-channels S   # CE-only baseline
    python student/train.py --logits data/cache --resume
    python student/train.py --logits data/cache-sampled          # a --targets sampled cache: RS-KD's loss, its tau
    torchrun --nproc-per-node 8 student/train.py --logits data/cache --device cuda   # DDP, one GPU a rank

First `--align-steps` steps align the speech encoder+adapter to the frozen
backbone by transcription (from the speech alone, predict the prompt's tokens),
as speech LLMs are built before their fine-tuning. Then the loss (the paper's
recipe by default: forward KL, tau 2, both channels, CE on the cached responses
of both channels; against a sampled cache the KD is RS-KD's estimator at the
temperature its ids were drawn at):

    total = alpha * tau^2 * KD(T->T) + beta * tau^2 * KD(S->T) + gamma * sum(CE over --ce-channels)

Samples and speech features are found through the cache manifest, the backbone
is the teacher named there (the student starts as a copy of the text LLM),
unless given. Batches stream from the cache and feature shards (memory does not
grow with the cache). Under torchrun every rank takes a disjoint share of each
global batch (--batch-size is global), losses are normalised by the global
count of positions so N ranks step exactly like one process, and rank 0 alone
writes <out>/metrics.csv, eval.csv, loss.png, checkpoint.pt and, at the end,
<out>/final (backbone in HF format + encoder/adapter + config).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # check the command line before the heavy imports: a bad option fails at once
    from pipeline.errors import run_cli
    from student.config import build_parser, config_from_args, world_size_from_env

    _parser = build_parser(description=__doc__)
    _status = run_cli(lambda: config_from_args(_parser.parse_args()).validate(world_size_from_env()) and 0,
                      prog="train.py")  # fmt: skip
    if _status:
        sys.exit(_status)

import contextlib
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.cache import read_manifest
from pipeline.errors import cli
from pipeline.features import feature_config_of
from pipeline.samples import load_samples
from student.config import ConfigError, TrainConfig, build_parser, config_from_args
from student.data import (
    BlockShuffleSampler,
    SpeechTemplate,
    StepBatches,
    StudentData,
    gather_positions,
    speech_inputs,
    to_device,
)
from student.evaluate import (HELDOUT_SETS, eval_set, evaluate_heldout_voice, evaluate_student, evaluate_teacher,
                              format_report, heldout_sets, references_for, voices_of)
from student.losses import KD_LOSSES, response_ce
from student.model import SpeechLLM, StudentConfig, pretrained_toy_encoder

# --- losses ---------------------------------------------------------------------------------------


def channel_losses(model, template, batch, cfg: TrainConfig, norms: dict, encoded=None) -> dict[str, torch.Tensor]:
    """KD and CE terms of each channel the config uses. `norms`: what to divide each sum by (see step());
    `encoded`: the encoder's output for the batch's speech, when the caller has it."""
    kd = KD_LOSSES[cfg.kd]
    ce_channels = cfg.ce_set()
    out = {}
    if "draw_ids" in batch:  # sampled targets
        targets = dict(sample_ids=batch["draw_ids"], sample_counts=batch["draw_counts"], mask=batch["mask"],
                       tau=cfg.tau, normalizer=norms["response"])  # fmt: skip
    else:
        targets = dict(teacher_ids=batch["topk_ids"], teacher_logprobs=batch["topk_logprobs"], mask=batch["mask"],
                       tau=cfg.tau, tail_logmass=batch["tail_logmass"], normalizer=norms["response"])  # fmt: skip
    if cfg.alpha > 0 or "T" in ce_channels:
        logits = model.forward_embeds(model.embed(batch["text_ids"]), batch["text_attention"])
        logits = gather_positions(logits, batch["text_response_pos"])
        if cfg.alpha > 0:
            out["kd_T"] = kd(logits, **targets)
        if "T" in ce_channels:
            out["ce_T"] = response_ce(logits, batch["response_ids"], batch["mask"], norms["response"])
    if cfg.beta > 0 or "S" in ce_channels:
        embeds, attention, pos = speech_inputs(model, template, batch, encoded=encoded)
        logits = gather_positions(model.forward_embeds(embeds, attention), pos)
        if cfg.beta > 0:
            out["kd_S"] = kd(logits, **targets)
        if "S" in ce_channels:
            out["ce_S"] = response_ce(logits, batch["response_ids"], batch["mask"], norms["response"])
    return out


def alignment_loss(model, batch, cfg: TrainConfig, norms: dict) -> dict[str, torch.Tensor]:
    """Speech alignment: from the speech alone, predict the prompt's own tokens, through the backbone
    (`align`) and, with --ctc-weight > 0, straight from the encoder frames by CTC (`ctc`)."""
    encoded = model.encoder(batch["speech"], batch["speech_lengths"])
    embeds, attention, pos = speech_inputs(model, SpeechTemplate([], []), batch, target="transcript", encoded=encoded)
    logits = gather_positions(model.forward_embeds(embeds, attention), pos)
    parts = {"align": response_ce(logits, batch["transcript_ids"], batch["transcript_mask"], norms["transcript"])}
    if cfg.ctc_weight > 0:
        # the transcript without its end-of-turn token
        parts["ctc"] = model.ctc_loss(encoded, batch["transcript_ids"], batch["transcript_mask"].sum(1) - 1,
                                      norms["examples"])  # fmt: skip
    return parts


WEIGHTS = {"kd_T": lambda c: c.alpha * c.tau**2, "kd_S": lambda c: c.beta * c.tau**2, "ce_T": lambda c: c.gamma,
           "ce_S": lambda c: c.gamma, "align": lambda c: 1.0, "ctc": lambda c: c.ctc_weight}  # fmt: skip


def total_loss(parts: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    return sum(WEIGHTS[name](cfg) * value for name, value in parts.items())


class Objective(torch.nn.Module):
    """The student and its losses as one module: what DistributedDataParallel wraps, since DDP synchronises
    the gradients of what its forward ran."""

    def __init__(self, model: SpeechLLM, template: SpeechTemplate, cfg: TrainConfig):
        super().__init__()
        self.model, self.template, self.cfg = model, template, cfg

    def forward(self, batch: dict, aligning: bool, norms: dict) -> dict[str, torch.Tensor]:
        if not aligning:
            if not (self.cfg.adapter == "ctc-embed" and self.cfg.ctc_weight > 0):
                return channel_losses(self.model, self.template, batch, self.cfg, norms)
            # the ctc-embed interface reads greedy CTC emissions, which no KD/CE gradient sees: token CTC stays
            # on so fine-tuning cannot pull the head off what it emits (measured: without it, 100 fine-tuning
            # steps took the aligned student's spoken exact match from ~67% to 2.4%)
            encoded = self.model.encoder(batch["speech"], batch["speech_lengths"])
            parts = channel_losses(self.model, self.template, batch, self.cfg, norms, encoded)
            parts["ctc"] = self.token_ctc(batch, norms, encoded)
            return parts
        parts = {}
        if self.cfg.align in ("transcribe", "both"):
            parts.update(alignment_loss(self.model, batch, self.cfg, norms))
        elif self.cfg.ctc_weight > 0:  # token CTC of the encoder frames stays on in every alignment mode
            parts["ctc"] = self.token_ctc(batch, norms)
        if self.cfg.align in ("behave", "both"):
            # behaviour alignment: from the spoken prompt, the frozen backbone should give the teacher's cached
            # distribution over the response (KD) and the response itself (CE), through the S channel only
            parts.update(channel_losses(self.model, self.template, batch, self.behave_cfg, norms))
        return parts

    def token_ctc(self, batch: dict, norms: dict, encoded=None) -> torch.Tensor:
        """CTC of the encoder frames against the prompt's tokens (without its end-of-turn token)."""
        if encoded is None:
            encoded = self.model.encoder(batch["speech"], batch["speech_lengths"])
        return self.model.ctc_loss(encoded, batch["transcript_ids"], batch["transcript_mask"].sum(1) - 1,
                                   norms["examples"])  # fmt: skip

    @property
    def behave_cfg(self) -> TrainConfig:
        return replace(self.cfg, alpha=0.0, beta=self.cfg.beta or 0.5, ce_channels="S")


# --- setup ----------------------------------------------------------------------------------------


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, device_kind: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}" if device_kind == "cuda" else "cpu")
        if device_kind == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            import datetime

            # generous timeout: the other ranks wait while rank 0 evaluates
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def finetune_groups(samples_dir: Path, cfg: TrainConfig) -> tuple[dict[str, str], set[str]] | None:
    """({sample_id: group} over all splits, the groups fine-tuned on), or None when fine-tuning on everything.

    A group is the value of meta key `cfg.finetune_group` (a sample without it is its own group); a seeded
    `cfg.finetune_fraction` of the training split's groups is kept.
    """
    if cfg.finetune_fraction >= 1.0:  # (its range is checked by TrainConfig.validate)
        return None
    table = load_samples(samples_dir).select(["sample_id", "split", "meta"])
    group = {sid: str(json.loads(meta or "{}").get(cfg.finetune_group, sid))
             for sid, meta in zip(table["sample_id"].to_pylist(), table["meta"].to_pylist())}  # fmt: skip
    train_ids = [sid for sid, split in zip(table["sample_id"].to_pylist(), table["split"].to_pylist())
                 if split == "train"]  # fmt: skip
    groups = sorted({group[sid] for sid in train_ids})
    random.Random(cfg.seed).shuffle(groups)
    return group, set(groups[: max(1, round(cfg.finetune_fraction * len(groups)))])


def build(cfg: TrainConfig, device: torch.device | str = "cpu"):
    """Tokenizer, the streaming training data (index only) + its join report, the student on `device`, the
    samples/features dirs (from the cache manifest unless given) and the teacher's path."""
    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader

    reader = CacheReader(cfg.logits, verify=cfg.verify)  # every shard checked once, here (workers reuse it)
    backbone = cfg.backbone or reader.teacher
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    data = StudentData(reader, tokenizer, cfg.samples, cfg.features, split="train")
    kind = feature_config_of(data.features_dir).kind
    if cfg.encoder != "conv-transformer" and pretrained_toy_encoder(cfg.encoder) is None and kind != "whisper":
        raise ConfigError(
            f"--encoder {cfg.encoder} takes Whisper log-mel features but {data.features_dir} holds {kind!r} "
            f"features: run `python -m pipeline.features --kind whisper --out data/features_whisper` and pass "
            f"--features data/features_whisper"
        )
    if not len(data):
        raise ConfigError(f"no training examples: {data.report.summary()}")
    freeze_encoder = cfg.freeze_encoder
    if freeze_encoder is None:  # a pretrained toy encoder is kept as built, as speech LLMs keep Whisper
        freeze_encoder = pretrained_toy_encoder(cfg.encoder) is not None
    scfg = StudentConfig(backbone=backbone, encoder=cfg.encoder, n_mels=data.features.cfg.n_mels,
                         dropout=cfg.encoder_dropout, train_encoder=not freeze_encoder,
                         train_adapter=not cfg.freeze_adapter, train_backbone=not cfg.freeze_backbone,
                         ctc=cfg.ctc_weight > 0 or cfg.adapter == "ctc-embed", adapter=cfg.adapter)  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = SpeechLLM(scfg).to(device)
    return tokenizer, data, model, reader.teacher


def make_optimizer(model: SpeechLLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [
        {"name": "speech", "params": [p for p in model.speech_parameters() if p.requires_grad], "lr": cfg.lr},
        {"name": "backbone", "params": [p for p in model.backbone.parameters() if p.requires_grad],
         "lr": cfg.backbone_lr},
    ]  # fmt: skip
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("every part of the student is frozen: nothing to train")
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
    torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": step, "config": asdict(cfg)}, tmp)
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


PARTS = ["align", "ctc", "kd_T", "kd_S", "ce_T", "ce_S"]
METRIC_FIELDS = ["step", "loss", *PARTS, "lr_speech", "lr_backbone", "data_s", "step_s"]
EVAL_FIELDS = ["step", "student_text_accuracy", "student_speech_accuracy", "n_eval"]


def append_csv(path: Path, fieldnames: list[str], row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


# --- the loop -------------------------------------------------------------------------------------


def step_norms(micro: list[dict], ranks: Dist) -> dict:
    """What each loss sum is divided by: the global count (all ranks, all micro-batches) of response
    positions, transcript positions and examples, over the world size (DDP averages gradients over ranks),
    so N ranks x A micro-batches take the same step as one process on the whole batch."""
    counts = torch.zeros(3, dtype=torch.float64)
    for b in micro:
        counts[0] += b["mask"].sum()
        counts[1] += b["transcript_mask"].sum()
        counts[2] += b["mask"].shape[0]
    counts = ranks.all_sum(counts)
    return {"response": counts[0].item() / ranks.world, "transcript": counts[1].item() / ranks.world,
            "examples": counts[2].item() / ranks.world}  # fmt: skip


def train(cfg: TrainConfig, progress: bool = True, final_eval: bool | None = None) -> dict:
    """Run the recipe; `final_eval` (default: cfg.final_eval) evaluates at the end."""
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    cfg = cfg.for_targets(read_manifest(Path(cfg.logits))["fingerprint"])  # --kd / --tau for the cache's targets
    ranks = Dist(cfg.resolved_device())
    try:
        return _train(cfg, ranks, progress, cfg.final_eval if final_eval is None else final_eval)
    finally:
        ranks.close()


def _train(cfg: TrainConfig, ranks: Dist, progress: bool, final_eval: bool) -> dict:
    out = Path(cfg.out)
    device, bf16 = ranks.device, cfg.resolved_precision() == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    tokenizer, data, model, teacher = build(cfg, device)
    say = print if ranks.main else (lambda *a, **k: None)
    say(f"student data: {data.report.summary()}")
    options = {option: getattr(cfg, option) for _, option, _, _ in HELDOUT_SETS}
    heldout = heldout_sets(data.features_dir, options) if final_eval else []
    for _, path, flag in heldout:
        from pipeline.features import FeatureStore

        heard = voices_of(data.features) & voices_of(FeatureStore(path))
        if heard:
            raise ConfigError(f"{flag} {path}: voice(s) {sorted(heard)} are also in the training speech "
                              f"({data.features_dir}); a held-out set must be spoken in voices training never "
                              f"used")  # fmt: skip
    say(f"device {device} ({cfg.resolved_precision()}), {ranks.world} rank(s), global batch {cfg.batch_size} = "
        f"{ranks.world} x {cfg.grad_accum} x {cfg.batch_size // (ranks.world * cfg.grad_accum)}")  # fmt: skip
    template = SpeechTemplate.from_tokenizer(tokenizer)
    optim = make_optimizer(model, cfg)

    # the data order: alignment over every example, fine-tuning over the kept groups' examples
    blocks = data.block_of()
    everything = np.arange(len(data))
    grouping = finetune_groups(data.samples_dir, cfg)
    ft = everything
    if grouping:
        group, kept = grouping
        ft = np.array([i for i in everything if group[data.sample_id(i)] in kept], dtype=np.int64)
        say(f"fine-tuning on {len(ft)} of {len(data)} examples ({cfg.finetune_fraction:g} of the "
            f"{cfg.finetune_group!r} groups); alignment on all")  # fmt: skip
    phases = []
    if cfg.align_steps:
        phases.append((0, BlockShuffleSampler(everything, blocks, cfg.batch_size, cfg.seed, cfg.shuffle_blocks)))
    if cfg.steps > cfg.align_steps:
        phases.append((cfg.align_steps, BlockShuffleSampler(ft, blocks[ft], cfg.batch_size, cfg.seed,
                                                            cfg.shuffle_blocks)))  # fmt: skip
    batches = StepBatches(data, phases, tokenizer.pad_token_id or 0, ranks.rank, ranks.world, cfg.grad_accum,
                          targets_from=cfg.align_steps if cfg.align == "transcribe" else 0)  # fmt: skip

    start = 0
    ckpt = out / "checkpoint.pt"
    if cfg.resume:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        start = state["step"]
        say(f"resumed from {ckpt} at step {start}")
    elif ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.csv", "eval.csv"):
            (out / name).unlink(missing_ok=True)
    ranks.barrier()
    objective = Objective(model, template, cfg)
    if ranks.world > 1:
        # the CTC head runs only while aligning, the T channel only while fine-tuning: unused parameters
        objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    refs = references_for(data.reader, cfg.reference)
    eval_rows = (eval_set(data.samples_dir, data.features_dir, limit=cfg.eval_limit, references=refs)
                 if cfg.eval_every and ranks.main else None)  # fmt: skip

    stop_at = min(cfg.steps, start + cfg.stop_after) if cfg.stop_after else cfg.steps
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, stop_at),
                                         num_workers=cfg.num_workers, pin_memory=device.type == "cuda")  # fmt: skip
    bar = tqdm(total=cfg.steps, initial=start, desc="student", unit="step", disable=not (progress and ranks.main))
    data_time = step_time = 0.0
    last: dict = {}
    t0 = time.perf_counter()
    for step, micro in zip(range(start, stop_at), loader):
        aligning = step < cfg.align_steps
        norms = step_norms(micro, ranks)
        micro = [to_device(b, device) for b in micro]
        t1 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + step * ranks.world + ranks.rank)  # dropout: a function of the step
        for g in optim.param_groups:
            # While aligning speech the backbone stays as the text LLM it was (lr 0).
            frozen = aligning and g["name"] == "backbone"
            base = g["base_lr"]
            if g["name"] == "speech" and not aligning and cfg.finetune_lr is not None:
                base = cfg.finetune_lr
            g["lr"] = 0.0 if frozen else base * lr_scale(step, cfg)
        model.train()
        logged = torch.zeros(len(PARTS) + 1, dtype=torch.float64)
        optim.zero_grad(set_to_none=True)
        for a, batch in enumerate(micro):
            sync = a == len(micro) - 1 or ranks.world == 1
            with (contextlib.nullcontext() if sync else objective.no_sync()), autocast():
                parts = objective(batch, aligning, norms)
                loss = total_loss(parts, cfg)
            loss.backward()
            logged[0] += loss.item()
            for name, value in parts.items():
                logged[1 + PARTS.index(name)] += value.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        logged = ranks.all_sum(logged) / ranks.world  # the global batch's mean losses
        t2 = time.perf_counter()
        data_time += t1 - t0
        step_time += t2 - t0
        done = step + 1
        lrs = {f"lr_{g['name']}": g["lr"] for g in optim.param_groups}
        last = {"step": done, "loss": logged[0].item(), **lrs, "data_s": t1 - t0, "step_s": t2 - t0,
                **{name: logged[1 + i].item() for i, name in enumerate(PARTS) if name in parts}}  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        if ranks.main:
            append_csv(out / "metrics.csv", METRIC_FIELDS, last)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:  # always at the end
                save_checkpoint(ckpt, model, optim, done, cfg)
            if eval_rows and done % cfg.eval_every == 0 and done != cfg.steps:
                with autocast():
                    r = evaluate_student(model, tokenizer, eval_rows, device=device)
                append_csv(out / "eval.csv", EVAL_FIELDS, {"step": done, **r})
                tqdm.write(f"step {done}: student text {r['student_text_accuracy']:.1%}, "
                           f"speech {r['student_speech_accuracy']:.1%} (on {r['n_eval']})")  # fmt: skip
        # (while rank 0 evaluates, the other ranks wait in the next step's all-reduce)
        t0 = time.perf_counter()
    bar.close()
    del loader
    if stop_at < cfg.steps:
        if ranks.main:
            save_checkpoint(ckpt, model, optim, stop_at, cfg)
            say(f"stopped after step {stop_at} (--stop-after); continue with --resume")
        ranks.barrier()
        return {"stopped_at": stop_at}

    result = {"final_loss": last.get("loss"), "steps": cfg.steps, "examples": len(data), "finetune_examples": len(ft),
              "data_fraction": data_time / step_time if step_time else 0.0, "world_size": ranks.world,
              "device": str(device), "precision": cfg.resolved_precision(),
              "step_s_mean": step_time / max(1, stop_at - start)}  # fmt: skip
    if ranks.main:
        plot(out / "metrics.csv", out / "loss.png")
        model.save(out / "final", tokenizer)
        if final_eval:
            rows = eval_set(data.samples_dir, data.features_dir, references=refs)
            result["reference"] = cfg.reference
            subsets = None
            if grouping:
                finetuned = {sid for sid in rows.sample_ids if group[sid] in kept}
                subsets = {"finetuned": finetuned, "not_finetuned": set(rows.sample_ids) - finetuned}
            with autocast():
                result.update(evaluate_student(model, tokenizer, rows, subsets=subsets, device=device))
                result["teacher_text_accuracy"] = evaluate_teacher(teacher, rows, device=device)
            result["forgetting"] = result["teacher_text_accuracy"] - result["student_text_accuracy"]
            for key, path, _ in heldout:
                with autocast():
                    result.update(evaluate_heldout_voice(model, tokenizer, eval_set(data.samples_dir, path,
                                                                                    references=refs),
                                                         subsets=subsets, key=key))  # fmt: skip
            print(format_report(result))
        (out / "result.json").write_text(json.dumps(result, indent=2))
        if stop_at > start:
            print(f"data loading: {result['data_fraction']:.1%} of step time; saved {out / 'final'}")
    ranks.barrier()
    return result


def parse_args(argv=None) -> TrainConfig:
    return config_from_args(build_parser(description=__doc__).parse_args(argv))


@cli("train.py")
def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
