"""Train the speech student from the cached teacher logits. The teacher is never run here.

    python student/train.py --config configs/demo.toml                    # the demo's recipe
    python student/train.py --logits data/cache
    python student/train.py --logits data/cache --alpha 0 --beta 0 --ce-channels S   # CE-only baseline
    python student/train.py --logits data/cache --resume
    python student/train.py --logits data/cache-sampled          # a --targets sampled cache: RS-KD's loss, its tau
    torchrun --nproc-per-node 8 student/train.py --logits data/cache --device cuda   # DDP, one GPU a rank

First `--align-steps` steps align the speech encoder+adapter to the frozen
backbone (`--align`), as speech LLMs are built before their fine-tuning. Then
the loss (the paper's recipe by default: forward KL, tau 2, both channels, CE on
the cached responses of both channels; against a sampled cache the KD is RS-KD's
estimator at the temperature its ids were drawn at):

    total = alpha * tau^2 * KD(T->T) + beta * tau^2 * KD(S->T) + gamma * sum(CE over --ce-channels)

Samples and speech features are found through the cache manifest, the backbone
is the teacher named there (the student starts as a copy of the text LLM),
unless given. Batches stream from the cache and feature shards (memory does not
grow with the cache). Under torchrun every rank takes a disjoint share of each
global batch (--batch-size is global), losses are normalised by the global
count of positions so N ranks step exactly like one process, and rank 0 alone
writes <out>/config.toml (the options this run ran with, a recipe --config reads
back), metrics.csv, eval.csv, loss.png, checkpoints/ and, at the end,
<out>/final (backbone in HF format + encoder/adapter + config: it loads from that
directory alone).

The recipe: setup() (inputs, model, optimizer, data order), run_steps() (the loop),
finish() (save, and the final evaluation student/evaluate.py also runs).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # check the command line before the heavy imports: a bad option fails at once
    from pipeline.config import parse_config
    from pipeline.errors import run_cli
    from student.config import TrainConfig, world_size_from_env

    _status = run_cli(lambda: parse_config(TrainConfig, description=__doc__).validate(world_size_from_env()) and 0,
                      prog="train.py")  # fmt: skip
    if _status:
        sys.exit(_status)

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache import CacheReader, read_manifest
from pipeline.config import dump_toml, parse_config
from pipeline.errors import cli
from pipeline.files import write_json_atomic, write_text_atomic
from student.checkpoint import load_checkpoint, remove_partial, save_checkpoint
from student.config import ConfigError, TrainConfig
from student.data import (BlockShuffleSampler, ComposedPrompts, SpeechLLMPrompts, StepBatches, StudentData,
                          check_tokenizer, to_device)
from student.distributed import Dist
from student.evaluate import eval_set, evaluate_run, evaluate_student, format_report, references_for
from student.inputs import HELDOUT_SETS, HeldoutSet, RunInputs, Samples
from student.interface import Student, build_student, save_student
from student.objective import PARTS, Objective, step_norms, total_loss
from student.parallel import apply_activation_checkpointing, no_sync, wrap
from student.parallel import blocks as blocks_of
from student.records import EVAL_FIELDS, METRIC_FIELDS, RECORDS, append_csv, cut_back, plot

# --- setup ----------------------------------------------------------------------------------------


def finetune_groups(samples: Samples, cfg: TrainConfig) -> tuple[dict[str, str], set[str]] | None:
    """({sample_id: group} over all splits, the groups fine-tuned on), or None when fine-tuning on everything.

    A group is the value of meta key `cfg.finetune_group` (a sample without it is its own group); a seeded
    `cfg.finetune_fraction` of the training split's groups is kept.
    """
    if cfg.finetune_fraction >= 1.0:  # (its range is checked by TrainConfig.validate)
        return None
    group = {sid: str(samples.meta(sid).get(cfg.finetune_group, sid)) for sid in samples.ids}
    groups = sorted({group[sid] for sid in samples.split("train")})
    random.Random(cfg.seed).shuffle(groups)
    return group, set(groups[: max(1, round(cfg.finetune_fraction * len(groups)))])


def make_optimizer(model: Student, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [
        {"name": "speech", "params": [p for p in model.speech_parameters() if p.requires_grad], "lr": cfg.lr},
        {"name": "backbone", "params": [p for p in model.backbone_parameters() if p.requires_grad],
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


def set_learning_rates(optim: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    aligning = step < cfg.align_steps
    for g in optim.param_groups:
        # While aligning speech the backbone stays as the text LLM it was (lr 0).
        base = g["base_lr"]
        if g["name"] == "speech" and not aligning and cfg.finetune_lr is not None:
            base = cfg.finetune_lr
        g["lr"] = 0.0 if aligning and g["name"] == "backbone" else base * lr_scale(step, cfg)


@dataclass
class Run:
    """Everything a training run holds once set up."""

    cfg: TrainConfig
    ranks: Dist
    inputs: RunInputs
    data: StudentData
    tokenizer: object
    model: Student
    optim: torch.optim.Optimizer
    objective: torch.nn.Module
    batches: StepBatches
    heldout: list[HeldoutSet]
    finetuned: set[str] | None  # the fine-tuned samples (--finetune-fraction), None for all
    finetune_examples: int
    start: int  # the first step to run (a resumed run's checkpoint step)
    out: Path
    dropped_targets: int = 0  # KD target entries dropped so far on this rank (ids that mean other tokens: vocab)

    @property
    def autocast(self):
        bf16 = self.cfg.resolved_precision() == "bf16"
        return lambda: torch.autocast(self.ranks.device.type, dtype=torch.bfloat16, enabled=bf16)

    def say(self, *args) -> None:
        if self.ranks.main:
            print(*args)


def setup(cfg: TrainConfig, ranks: Dist, final_eval: bool) -> Run:
    """Inputs (the cache checked once, the samples read once), the held-out sets (refused when training heard
    their voices), the student, the optimizer, the data order, and a resumed run's state."""
    from transformers import AutoTokenizer

    reader = CacheReader(cfg.logits, verify=cfg.verify)  # every shard checked once, here
    backbone = None
    if cfg.kind == "hf":  # a pretrained speech LLM: its own template and processor
        from transformers import AutoProcessor

        from student.hf import model_class

        model_class(cfg.student)  # a model speechkd cannot train is refused before anything else is read
        processor = AutoProcessor.from_pretrained(cfg.student)
        tokenizer, prompts = processor.tokenizer, SpeechLLMPrompts(processor)
    else:
        backbone = cfg.backbone or reader.teacher
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        prompts = ComposedPrompts(tokenizer)
    check_tokenizer(reader, tokenizer)  # before any other input is read: a mismatch fails at once
    inputs = RunInputs.open(reader, cfg.samples, cfg.features, verify=cfg.verify,
                            speech="audio" if cfg.kind == "hf" else "features", audio_dir=cfg.audio)  # fmt: skip
    data = StudentData(inputs, tokenizer, split="train", prompts=prompts)
    if not len(data):
        raise ConfigError(f"no training examples: {data.report.summary()}")
    options = {option: getattr(cfg, option) for _, option, _, _ in HELDOUT_SETS}
    heldout = inputs.heldout_sets(options) if final_eval else []
    model = build_student(cfg, data, backbone, ranks.device)
    checkpointed = apply_activation_checkpointing(model) if cfg.activation_checkpointing else 0
    objective = Objective(model, cfg)
    bf16 = cfg.resolved_precision() == "bf16"
    objective = wrap(objective, cfg.parallel, ranks.world, ranks.device, bf16)  # FSDP2 shards it in place
    optim = make_optimizer(model, cfg)  # after sharding: the optimizer holds each rank's shards

    # the data order: alignment over every example, fine-tuning over the kept groups' examples
    blocks = data.block_of()
    everything = np.arange(len(data))
    grouping = finetune_groups(inputs.samples, cfg)
    ft, finetuned = everything, None
    if grouping:
        group, kept = grouping
        finetuned = {sid for sid, g in group.items() if g in kept}
        ft = np.array([i for i in everything if data.sample_id(i) in finetuned], dtype=np.int64)
    phases = []
    if cfg.align_steps:
        phases.append((0, BlockShuffleSampler(everything, blocks, cfg.batch_size, cfg.seed, cfg.shuffle_blocks)))
    if cfg.steps > cfg.align_steps:
        phases.append((cfg.align_steps, BlockShuffleSampler(ft, blocks[ft], cfg.batch_size, cfg.seed,
                                                            cfg.shuffle_blocks)))  # fmt: skip
    batches = StepBatches(data, phases, tokenizer.pad_token_id or 0, ranks.rank, ranks.world, cfg.grad_accum,
                          targets_from=cfg.align_steps if cfg.align == "transcribe" else 0)  # fmt: skip

    out, start, resumed_from = Path(cfg.out), 0, None
    if cfg.resume:
        remove_partial(out) if ranks.main else None
        ranks.barrier()
        start, resumed_from = load_checkpoint(out, model, optim, ranks, cfg.resume)
        if ranks.main:
            cut_back(out, start)  # metrics.csv / eval.csv: every step once, as the uninterrupted run wrote them
    elif ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        for name in RECORDS:
            (out / name).unlink(missing_ok=True)
    if ranks.main:
        write_text_atomic(out / "config.toml", dump_toml(cfg, "the options of this run (python student/train.py "
                                                              "--config this-file repeats it)"))  # fmt: skip
        write_json_atomic(out / "tokenizer_check.json", data.vocab.to_dict())  # what was decided about the ids
    ranks.barrier()
    run = Run(cfg, ranks, inputs, data, tokenizer, model, optim, objective, batches, heldout, finetuned, len(ft),
              start, out)  # fmt: skip
    run.say(f"student data: {data.report.summary()}; {data.vocab.summary()}")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.say(f"student: {model.kind} ({cfg.student or 'composed: ' + cfg.encoder + ' + ' + cfg.adapter + ' + ' + backbone}"
            f"), {trained / 1e6:.2f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters trained"
            + (f" (LoRA rank {cfg.lora_rank})" if cfg.lora_rank else ""))  # fmt: skip
    if finetuned is not None:
        run.say(f"fine-tuning on {len(ft)} of {len(data)} examples ({cfg.finetune_fraction:g} of the "
                f"{cfg.finetune_group!r} groups); alignment on all")  # fmt: skip
    run.say(f"device {ranks.device} ({cfg.resolved_precision()}), {ranks.world} rank(s), global batch "
            f"{cfg.batch_size} = {ranks.world} x {cfg.grad_accum} x "
            f"{cfg.batch_size // (ranks.world * cfg.grad_accum)}")  # fmt: skip
    if cfg.parallel == "fsdp":
        run.say(f"FSDP2: {ranks.world} rank(s), the student's {len(blocks_of(model))} transformer blocks and the rest "
                f"sharded ({'bf16 compute, fp32 reduction' if ranks.device.type == 'cuda' and bf16 else 'fp32'})")  # fmt: skip
    if checkpointed:
        run.say(f"activation checkpointing: {checkpointed} transformer blocks recomputed in the backward pass")
    if resumed_from is not None:
        run.say(f"resumed from {resumed_from} at step {start}")
    return run


# --- the loop -------------------------------------------------------------------------------------


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory: the GPU's allocated peak, or on CPU the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / (1 << 20)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gathered(run: Run):
    """The whole trained student, unsharded, on rank 0 (None elsewhere): every rank joins the gather of the FSDP2
    shards into one full state dict (offloaded to CPU), which rank 0 loads into a plain copy of the student."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.ranks.main:
        return None
    plain = build_student(run.cfg, run.data, run.cfg.backbone or run.inputs.reader.teacher
                          if run.cfg.kind == "composed" else None, "cpu")  # fmt: skip
    plain.load_state_dict(full)
    return plain.to(run.ranks.device)


def train_step(run: Run, step: int, micro: list[dict]) -> dict:
    """One optimizer step over this rank's micro-batches; the global batch's mean losses."""
    cfg, ranks, device = run.cfg, run.ranks, run.ranks.device
    aligning = step < cfg.align_steps
    norms = step_norms(micro, ranks)
    micro = [to_device(b, device) for b in micro]
    torch.manual_seed(cfg.seed * 1_000_003 + step * ranks.world + ranks.rank)  # dropout: a function of the step
    set_learning_rates(run.optim, step, cfg)
    run.model.train()
    logged = torch.zeros(len(PARTS) + 1, dtype=torch.float64)
    run.optim.zero_grad(set_to_none=True)
    for a, batch in enumerate(micro):
        with no_sync(run.objective, last=a == len(micro) - 1), run.autocast():
            parts = run.objective(batch, aligning, norms)
            loss = total_loss(parts, cfg)
        loss.backward()
        logged[0] += loss.item()
        for name, value in parts.items():
            logged[1 + PARTS.index(name)] += value.item()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optim.step()
    logged = ranks.all_sum(logged) / ranks.world  # the global batch's mean losses
    run.dropped_targets += sum(int(b["dropped_targets"]) for b in micro)
    lrs = {f"lr_{g['name']}": g["lr"] for g in run.optim.param_groups}
    return {"step": step + 1, "loss": logged[0].item(), **lrs,
            **{name: logged[1 + i].item() for i, name in enumerate(PARTS) if name in parts}}  # fmt: skip


def run_steps(run: Run, stop_at: int, progress: bool) -> dict:
    """Steps run.start .. stop_at: metrics.csv per step, checkpoints, periodic evals (rank 0); timing totals."""
    cfg, ranks, out = run.cfg, run.ranks, run.out
    eval_rows = None
    if cfg.eval_every and cfg.parallel == "fsdp":
        run.say("note: no periodic evals under --parallel fsdp (the model is sharded over the ranks); the final eval "
                "runs on the gathered model")  # fmt: skip
    elif cfg.eval_every and ranks.main:
        refs = references_for(run.inputs.reader, cfg.reference)
        eval_rows = eval_set(run.inputs.samples, run.inputs.speech, limit=cfg.eval_limit, references=refs)
    loader = torch.utils.data.DataLoader(run.batches, batch_size=None, sampler=range(run.start, stop_at),
                                         num_workers=cfg.num_workers, pin_memory=ranks.device.type == "cuda")  # fmt: skip
    bar = tqdm(total=cfg.steps, initial=run.start, desc="student", unit="step", disable=not (progress and ranks.main))
    timing = {"data_s": 0.0, "step_s": 0.0, "last": {}}
    t0 = time.perf_counter()
    for step, micro in zip(range(run.start, stop_at), loader):
        t1 = time.perf_counter()
        last = train_step(run, step, micro)
        t2 = time.perf_counter()
        last.update(data_s=t1 - t0, step_s=t2 - t0)
        timing["data_s"] += t1 - t0
        timing["step_s"] += t2 - t0
        timing["last"] = last
        done = last["step"]
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        if ranks.main:
            append_csv(out / "metrics.csv", METRIC_FIELDS, last)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:  # always at the end; every rank
            save_checkpoint(out, run.model, run.optim, done, cfg, ranks, cfg.keep_checkpoints)
        if ranks.main:
            if eval_rows and done % cfg.eval_every == 0 and done != cfg.steps:
                with run.autocast():
                    r = evaluate_student(run.model, eval_rows, device=ranks.device)
                append_csv(out / "eval.csv", EVAL_FIELDS, {"step": done, **r})
                tqdm.write(f"step {done}: student text {r['student_text_accuracy']:.1%}, "
                           f"speech {r['student_speech_accuracy']:.1%} (on {r['n_eval']})")  # fmt: skip
        # (while rank 0 evaluates, the other ranks wait in the next step's all-reduce)
        t0 = time.perf_counter()
    bar.close()
    del loader
    return timing


# --- finish ---------------------------------------------------------------------------------------


def finish(run: Run, stop_at: int, timing: dict, final_eval: bool) -> dict:
    """Save the final student (rank 0), then the final evaluation: the function student/evaluate.py runs."""
    cfg, ranks, out = run.cfg, run.ranks, run.out
    steps_run = max(1, stop_at - run.start)
    memory = ranks.all_gather_float(peak_memory_mib(ranks.device))
    result = {"final_loss": timing["last"].get("loss"), "steps": cfg.steps, "examples": len(run.data),
              "finetune_examples": run.finetune_examples, "data_fraction": timing["data_s"] / timing["step_s"] if timing["step_s"] else 0.0,
              "world_size": ranks.world, "device": str(ranks.device), "precision": cfg.resolved_precision(),
              "step_s_mean": timing["step_s"] / steps_run, "student_kind": run.model.kind,
              "parallel": cfg.parallel, "peak_memory_mib": [round(m) for m in memory],
              "parameters": sum(p.numel() for p in run.model.parameters()),
              "parameters_trained": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
              "kd_targets_dropped": int(ranks.all_sum(torch.tensor([run.dropped_targets], dtype=torch.float64))[0])}  # fmt: skip
    model = gathered(run) if cfg.parallel == "fsdp" else run.model  # every rank takes part in the gather
    if ranks.main:
        plot(out / "metrics.csv", out / "loss.png")
        save_student(model, out / "final", run.tokenizer, merge=cfg.merge)
        if final_eval:
            result.update(evaluate_run(model, run.inputs, cfg.reference, run.heldout,
                                       finetuned=run.finetuned, device=ranks.device, autocast=run.autocast))  # fmt: skip
            print(format_report(result))
        write_json_atomic(out / "result.json", result)
        if stop_at > run.start:
            print(f"data loading: {result['data_fraction']:.1%} of step time; saved {out / 'final'}")
    ranks.barrier()
    return result


def train(cfg: TrainConfig, progress: bool = True, final_eval: bool | None = None) -> dict:
    """Run the recipe; `final_eval` (default: cfg.final_eval) evaluates at the end."""
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    cfg = cfg.for_targets(read_manifest(Path(cfg.logits))["fingerprint"])  # --kd / --tau for the cache's targets
    final_eval = cfg.final_eval if final_eval is None else final_eval
    ranks = Dist(cfg.resolved_device(), group=cfg.parallel == "fsdp")
    try:
        run = setup(cfg, ranks, final_eval)
        stop_at = min(cfg.steps, run.start + cfg.stop_after) if cfg.stop_after else cfg.steps
        timing = run_steps(run, stop_at, progress)
        if stop_at < cfg.steps:
            if not cfg.save_every or stop_at % cfg.save_every:  # else run_steps saved it already
                save_checkpoint(run.out, run.model, run.optim, stop_at, cfg, ranks, cfg.keep_checkpoints)
            run.say(f"stopped after step {stop_at} (--stop-after); continue with --resume")
            ranks.barrier()
            return {"stopped_at": stop_at}
        return finish(run, stop_at, timing, final_eval)
    finally:
        ranks.close()


def parse_args(argv=None) -> TrainConfig:
    return parse_config(TrainConfig, argv, description=__doc__)


@cli("train.py")
def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
