"""The student stage's configs: every CLI flag, its type, default, choices and help, declared once.

`StudentInputs` holds what training and evaluation share (the cache, the inputs it names, the held-out sets, the
device); `TrainConfig` adds the model, the schedule and the losses, `EvalConfig` the student to evaluate. The
commands' flags are generated from them (pipeline.config), a recipe file (`--config configs/demo.toml`) sets any
of them, and `validate` checks every option before any model or data is loaded, so a typo fails in under a
second with the allowed values named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import config as stage_config
from pipeline.config import ConfigError, listed, opt  # noqa: F401 - ConfigError is this stage's error type too

KD_CHOICES = ("forward_kl", "forward_kl_tail", "reverse_kl", "sampled")
TOPK_KD_DEFAULT, TOPK_TAU_DEFAULT = "forward_kl", 2.0
DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
CHANNELS = ("T", "S")
ALIGN_CHOICES = ("transcribe", "behave", "both", "ctc")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class StudentInputs:
    """What training and evaluation read: the cache, the samples and speech it names, the held-out sets."""

    logits: str = opt("data/cache", "the teacher logit cache (its manifest names the samples, features and teacher)")
    samples: str | None = opt(None, "samples directory (default: from the cache manifest)")
    features: str | None = opt(None, "speech features directory (default: from the cache manifest)")
    audio: str | None = opt(None, "speech audio directory (an audio index), read by a student that runs its own "
                                  "processor (--student): default from the cache manifest, else <features>/../audio")  # fmt: skip
    heldout_features: str = opt("auto", "speech features of the eval split in a voice never used in training, "
                                        "for the final eval's held-out-voice column (auto: <features>-heldout-voice, "
                                        "which the flow writes, when it exists; '': none)")  # fmt: skip
    heldout_tts_features: str = opt("auto", "speech features of the eval split spoken by a synthesizer training "
                                            "never used, for the final eval's held-out-synthesizer column (auto: "
                                            "<features>-heldout-tts, which the flow writes, when it exists; '': "
                                            "none)")  # fmt: skip
    verify: bool = opt(True, "check every cache and feature shard (and a saved student's files) against the sha256 "
                             "their manifests recorded before reading them (--no-verify: skip, for people who know "
                             "the files are intact)")  # fmt: skip
    reference: str = opt("dataset", "what the eval's exact match compares to: the dataset's answers, or the "
                                    "teacher's cached ones (a cache made with --responses teacher)",
                         ("dataset", "teacher"))  # fmt: skip
    device: str = opt("auto", "where to run: auto = cuda when available", DEVICE_CHOICES)
    precision: str = opt("auto", "auto = bf16 autocast on a GPU that supports it, fp32 otherwise", PRECISION_CHOICES)

    def check_inputs(self) -> None:
        """The options shared by training and evaluation, checked before any work."""
        stage_config.check_choices(self)
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("--device cuda: no CUDA device is visible to torch here; use --device cpu (or auto)")
        if self.precision == "bf16" and self.resolved_device() == "cuda":
            import torch

            if not torch.cuda.is_bf16_supported():
                raise ConfigError("--precision bf16: this GPU does not support bfloat16; use --precision fp32")
        manifest = Path(self.logits) / "manifest.json"
        if not manifest.exists():
            raise ConfigError(f"--logits {self.logits}: no cache there (no manifest.json); run the cache-teacher "
                              f"flow first (`python flows/cache_teacher.py`) or point --logits at a cache")  # fmt: skip

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def resolved_precision(self) -> str:
        if self.precision != "auto":
            return self.precision
        import torch

        return "bf16" if self.resolved_device() == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


@dataclass
class TrainConfig(StudentInputs):
    """`student/train.py`: the inputs, the model, the schedule, the losses."""

    out: str = opt("data/runs/student", "run directory: config.toml, metrics.csv, eval.csv, loss.png, checkpoints/, "
                                        "final/")  # fmt: skip
    num_workers: int = opt(1, "DataLoader worker processes reading and decoding batches (0: in the training process)")
    shuffle_blocks: int = opt(8, "shuffle window, in cache row groups (256 rows each): examples are shuffled "
                                 "within a window of this many randomly ordered row groups; memory grows with it, "
                                 "not with the cache")  # fmt: skip
    # --- model: a pretrained speech LLM (--student), or one composed of --encoder + --adapter + --backbone
    student: str | None = opt(None, "a pretrained speech LLM to distil into, HF id or path (Qwen2-Audio, the "
                                    "Qwen2.5-Omni thinker; student/hf.py): loaded with its own class and processor. "
                                    "None: the composed student, --encoder + --adapter + --backbone")  # fmt: skip
    backbone: str | None = opt(None, "composed student: backbone LLM, HF id or path (default: the teacher named in "
                                     "the cache manifest)")  # fmt: skip
    encoder: str = opt("conv-transformer", "speech encoder: conv-transformer (from scratch), a pretrained toy encoder "
                                           "(python -m toy.encoder: data/models/encoder) or a Whisper id/path")  # fmt: skip
    encoder_dropout: float = opt(0.1, "dropout in the conv-transformer encoder")
    adapter: str = opt("mlp", "speech -> backbone interface: mlp (frame stacking + MLP) or ctc-embed (LegoSLM-style: "
                              "the CTC head's token posteriors x the backbone's embeddings, at CTC emissions)",
                       ("mlp", "ctc-embed"))  # fmt: skip
    freeze_encoder: bool | None = opt(None, "do not train the speech encoder (or its CTC head); default: frozen when "
                                            "it is pretrained (a toy encoder, a speech LLM's audio tower), trained "
                                            "otherwise")  # fmt: skip
    freeze_adapter: bool = opt(False, "do not train the adapter")
    freeze_backbone: bool = opt(False, "do not train the backbone LLM")
    lora_rank: int = opt(0, "LoRA adapters of this rank on the LM (peft); 0: full fine-tuning")
    lora_alpha: float = opt(16.0, "LoRA scaling numerator (the update is alpha / rank x B A)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA adapters' input")
    lora_targets: list[str] = listed(DEFAULT_LORA_TARGETS, "module names (inside the LM) that get adapters")
    lora_audio: bool = opt(False, "LoRA adapters on a speech LLM's audio tower too (its attention and MLP) instead "
                                  "of training it whole or freezing it")  # fmt: skip
    merge: bool = opt(False, "with --lora-rank: also write final/merged/, the adapters merged into a plain model")
    parallel: str = opt("ddp", "under torchrun: ddp (a whole copy of the student per rank) or fsdp (FSDP2: each "
                               "rank holds 1/N of every parameter, gradient and optimizer state; student/parallel.py)",
                        ("ddp", "fsdp"))  # fmt: skip
    activation_checkpointing: bool = opt(False, "recompute each transformer block in the backward pass instead of "
                                                "keeping its activations (the same losses, less memory)")  # fmt: skip
    loss_chunk: int = opt(512, "response positions per chunk of the LM head + KD/CE loss (peak memory of the loss "
                               "is chunk x vocabulary; 0: all at once)")  # fmt: skip
    # --- schedule
    steps: int = opt(600, "optimizer steps in all, alignment included")
    align_steps: int | None = opt(None, "first: the speech side is aligned to the frozen backbone (see --align); "
                                        "default 300 for the composed student, 0 for a pretrained speech LLM "
                                        "(--student), which hears already")  # fmt: skip
    align: str = opt("transcribe", "alignment loss: transcribe (the spoken prompt -> its own tokens, + CTC), behave "
                                   "(the spoken prompt -> the teacher's cached response distribution: KD + CE, as "
                                   "BLSP/DiVA align behaviour; + CTC), both, or ctc (token CTC of the encoder "
                                   "frames alone: the backbone is not run, so a step is cheap)", ALIGN_CHOICES)  # fmt: skip
    batch_size: int = opt(32, "global batch (examples per optimizer step, over all ranks and accumulation steps)")
    grad_accum: int = opt(1, "gradient accumulation steps per optimizer step (per-rank micro-batch = "
                             "batch-size / (world size * grad-accum))")  # fmt: skip
    lr: float = opt(1e-3, "learning rate of the encoder + adapter (+ CTC head)")
    backbone_lr: float = opt(3e-4, "learning rate of the backbone (0 while aligning)")
    finetune_lr: float | None = opt(None, "learning rate of the speech side while fine-tuning (default: --lr)")
    warmup: int = opt(50, "linear warm-up steps, at the start of each phase")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    # --- losses: total = alpha*tau^2*KD(T->T) + beta*tau^2*KD(S->T) + gamma*sum(CE over --ce-channels)
    kd: str | None = opt(None, "KD loss: forward_kl, forward_kl_tail or reverse_kl against a top-k cache; sampled "
                               "(RS-KD's unbiased estimator) against a sampled cache (--targets sampled); default: "
                               "forward_kl, or sampled for a sampled cache", KD_CHOICES)  # fmt: skip
    tau: float | None = opt(None, "KD temperature (default: 2.0 against a top-k cache; a sampled cache's draw "
                                  "temperature, the only one its draws estimate)")  # fmt: skip
    alpha: float = opt(0.5, "T->T KD weight (lambda in the paper)")
    beta: float = opt(0.5, "S->T KD weight")
    gamma: float = opt(1.0, "CE weight")
    ce_channels: str = opt("T,S", "channels with CE on the cached response: comma-separated subset of T,S, or ''")
    ctc_weight: float = opt(1.0, "CTC on the encoder frames during alignment (0: none, and no CTC head)")
    # Fine-tune on the samples of only this fraction of the groups (meta key `finetune_group`, e.g. the toy
    # world's entities); alignment still hears every training prompt. Models the paper's setting: speech
    # fine-tuning data that covers part of what the model knows, evaluated on all of it.
    finetune_fraction: float = opt(1.0, "fine-tune on a seeded fraction of the groups (alignment hears all)")
    finetune_group: str = opt("entity", "meta key that names a sample's group for --finetune-fraction")
    # --- bookkeeping
    final_eval: bool = opt(True, "evaluate at the end: teacher text, student text and speech on the eval split")
    eval_every: int = opt(200, "evaluate every N steps (0: only at the end)")
    eval_limit: int = opt(300, "eval questions during training (the final eval uses all)")
    save_every: int = opt(200, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints (<out>/checkpoints/step-*)")
    seed: int = opt(0, "seeds the initialisation, the data order and dropout")
    resume: str | None = opt(None, "continue from a checkpoint of <out>, verified against its manifest first: latest "
                                   "(--resume alone) or previous (the one before it, when the newest is corrupt)",
                             ("latest", "previous"), const="latest")  # fmt: skip
    stop_after: int | None = opt(None, "train this many steps now (checkpointed), --resume later")

    def __post_init__(self):
        if self.align_steps is None:
            self.align_steps = 0 if self.student else 300
        if isinstance(self.resume, bool):  # resume=True from code (the benches): the latest checkpoint
            self.resume = "latest" if self.resume else None

    @property
    def kind(self) -> str:
        """The student's kind: hf (a pretrained speech LLM, --student) or composed."""
        return "hf" if self.student else "composed"

    def ce_set(self) -> set[str]:
        return {c.strip() for c in self.ce_channels.split(",") if c.strip()}

    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Every option checked before work starts: raises ConfigError naming the option and what is allowed."""
        self.check_inputs()
        bad = self.ce_set() - set(CHANNELS)
        if bad:
            raise ConfigError(f"--ce-channels {self.ce_channels!r}: unknown channel(s) {sorted(bad)}; use T, S or T,S")
        positive = ("steps", "batch_size", "grad_accum", "shuffle_blocks")
        if self.lora_rank < 0:
            raise ConfigError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if self.lora_rank and not self.lora_targets:
            raise ConfigError("--lora-targets: give at least one module name (e.g. q_proj,v_proj)")
        if self.merge and not self.lora_rank:
            raise ConfigError("--merge merges LoRA adapters: it needs --lora-rank > 0")
        if self.lora_audio and not (self.lora_rank and self.student):
            raise ConfigError("--lora-audio puts adapters on a speech LLM's audio tower: it needs --student and "
                              "--lora-rank > 0")  # fmt: skip
        if self.student:
            composed_only = {"backbone": None, "encoder": "conv-transformer", "adapter": "mlp"}
            for name, default in composed_only.items():
                if getattr(self, name) != default:
                    raise ConfigError(f"--{_flag(name)} is the composed student's; a pretrained speech LLM "
                                      f"(--student {self.student}) has its own")  # fmt: skip
            if self.align_steps:
                raise ConfigError(f"--align-steps {self.align_steps}: a pretrained speech LLM (--student) is aligned "
                                  f"already; speechkd distils into it directly (--align-steps 0)")  # fmt: skip
        nonneg = ("align_steps", "num_workers", "loss_chunk", "lora_dropout", "warmup", "eval_every", "eval_limit", "save_every", "lr",
                  "backbone_lr", "weight_decay", "alpha", "beta", "gamma", "ctc_weight", "encoder_dropout")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.finetune_lr is not None and self.finetune_lr < 0:
            raise ConfigError(f"--finetune-lr must be >= 0, got {self.finetune_lr}")
        if self.tau is not None and self.tau <= 0:
            raise ConfigError(f"--tau must be > 0, got {self.tau}")
        if self.align == "ctc" and self.align_steps and self.ctc_weight <= 0:
            raise ConfigError("--align ctc aligns by token CTC alone: it needs --ctc-weight > 0")
        if self.align_steps > self.steps:
            raise ConfigError(f"--align-steps {self.align_steps} exceeds --steps {self.steps} (steps count both phases)")
        if not 0.0 < self.finetune_fraction <= 1.0:
            raise ConfigError(f"--finetune-fraction must be in (0, 1], got {self.finetune_fraction}")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ConfigError(f"--stop-after must be > 0, got {self.stop_after}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"--encoder-dropout must be in [0, 1), got {self.encoder_dropout}")
        per_step = world_size * self.grad_accum
        if self.batch_size % per_step:
            raise ConfigError(
                f"--batch-size {self.batch_size} is not divisible by world size {world_size} x --grad-accum "
                f"{self.grad_accum}: every rank and micro-step takes an equal share of the global batch"
            )
        if self.steps > self.align_steps and not (self.alpha or self.beta or (self.gamma and self.ce_set())):
            raise ConfigError("the fine-tuning phase has no loss: set --alpha, --beta or --gamma with --ce-channels")
        if self.resume:
            from student.checkpoint import has_checkpoint

            if not has_checkpoint(Path(self.out)):
                raise ConfigError(f"--resume: no checkpoint in {Path(self.out) / 'checkpoints'}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.parallel == "fsdp" and "WORLD_SIZE" not in os.environ:
            raise ConfigError("--parallel fsdp shards the student over torchrun's processes: run it under torchrun "
                              "(torchrun --nproc-per-node N student/train.py ...)")  # fmt: skip
        return self

    def for_targets(self, fingerprint: dict) -> "TrainConfig":
        """This config with --kd and --tau resolved for the cache's targets (its manifest's fingerprint); a loss or
        temperature the targets cannot serve is refused."""
        from dataclasses import replace

        if fingerprint.get("targets") == "sampled":
            drawn_at = fingerprint["draw_temperature"]
            if self.kd not in (None, "sampled"):
                raise ConfigError(f"--kd {self.kd}: {self.logits} holds sampled targets (ids drawn from the teacher, "
                                  f"with counts), not top-k logprobs; its loss is --kd sampled (the default for it)")  # fmt: skip
            if self.tau is not None and abs(self.tau - drawn_at) > 1e-9:
                raise ConfigError(f"--tau {self.tau:g}: the targets in {self.logits} were drawn at temperature "
                                  f"{drawn_at:g}, and estimate the teacher's distribution at that temperature only; "
                                  f"leave --tau out (or pass {drawn_at:g}), or re-cache with --draw-temperature "
                                  f"{self.tau:g}")  # fmt: skip
            return replace(self, kd="sampled", tau=drawn_at)
        if self.kd == "sampled":
            raise ConfigError(f"--kd sampled: {self.logits} holds top-k targets; sampled KD needs a cache made with "
                              f"--targets sampled (or use --kd forward_kl)")  # fmt: skip
        return replace(self, kd=self.kd or TOPK_KD_DEFAULT, tau=self.tau if self.tau is not None else TOPK_TAU_DEFAULT)

@dataclass
class EvalConfig(StudentInputs):
    """`student/evaluate.py`: a trained student on the eval split, typed and spoken, and the held-out sets."""

    student: str = opt("data/runs/student/final", "the student to evaluate (a training run's final/)")
    limit: int | None = opt(None, "only the first N eval questions")

    def validate(self) -> "EvalConfig":
        if not any((Path(self.student) / name).exists() for name in ("student_config.json", "speechkd_student.json")):
            from pipeline.errors import MissingInput

            raise MissingInput(f"no student at {self.student} (no student_config.json or speechkd_student.json): "
                               f"train one with `python student/train.py` or pass --student <run>/final")  # fmt: skip
        self.check_inputs()
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        return self


@dataclass
class BenchmarkConfig:
    """`python -m student.bench_eval`: a trained student and the text teacher on a VoiceBench-format benchmark."""

    benchmark: str = opt("data/benchmark", "the benchmark's directory: one directory per subset, as `datasets` "
                                           "saves them (student/benchmark.py)")  # fmt: skip
    student: str = opt("data/runs/student/final", "the student to evaluate (a training run's final/)")
    logits: str = opt("data/cache", "the cache the student learned from: names the teacher, the features and the "
                                    "fingerprint the report records ('': none; then pass --teacher)")  # fmt: skip
    teacher: str | None = opt(None, "the text teacher answering the typed questions (default: the cache's)")
    judge: str | None = opt(None, "the judge LLM of the open-ended subsets, served by vLLM (default: the teacher)")
    features: str | None = opt(None, "a composed student's speech features directory, whose feature config turns "
                                     "the benchmark's audio into its features (default: the cache's)")  # fmt: skip
    subsets: list[str] = listed((), "subsets to evaluate (default: every one the benchmark has)")
    splits: list[str] = listed((), "splits to read (default: all; sd-qa's are regions: usa, aus, ...)")
    limit: int | None = opt(None, "only the first N questions of each split")
    max_new_tokens: int = opt(256, "longest answer generated (teacher and student)")
    judge_max_new_tokens: int = opt(16, "longest judgment generated")
    judge_prompt: str | None = opt(None, "a file with another 1-5 judging prompt than student/judge.py's (fields "
                                         "{prompt} and {response}; the reply is a rating 1-5)")  # fmt: skip
    judge_qa_prompt: str | None = opt(None, "a file with another reference-QA judging prompt (fields {prompt}, "
                                            "{reference}, {response}; the reply is yes or no)")  # fmt: skip
    batch_size: int = opt(64, "questions per student generation batch (the final eval's)")
    seed: int = opt(0, "seeds the multiple-choice fallback draws (reported beside each score)")
    dtype: str = opt("auto", "the teacher's / judge's vLLM dtype")
    kv_cache_gib: float = opt(2.0, "CPU: the vLLM engines' KV cache size")
    out: str | None = opt(None, "where the report goes (default: <student>/../benchmark)")
    verify: bool = opt(True, "check the saved student's files against their recorded sha256 first")
    device: str = opt("auto", "where the student runs: auto = cuda when available", DEVICE_CHOICES)

    def validate(self) -> "BenchmarkConfig":
        from pipeline.errors import MissingInput

        stage_config.check_choices(self)
        if not Path(self.benchmark).is_dir():
            raise MissingInput(f"--benchmark {self.benchmark}: no such directory; save VoiceBench there "
                               f"(docs/evaluation.md) or export the toy world's (`python -m toy.world "
                               f"--export-benchmark {self.benchmark}`)")  # fmt: skip
        if not any((Path(self.student) / n).exists() for n in ("student_config.json", "speechkd_student.json")):
            raise MissingInput(f"--student {self.student}: no student there (no student_config.json or "
                               f"speechkd_student.json); train one with `python student/train.py`")  # fmt: skip
        if self.logits and not (Path(self.logits) / "manifest.json").exists():
            raise MissingInput(f"--logits {self.logits}: no cache there (no manifest.json); pass the cache the "
                               f"student learned from, or --logits '' --teacher ID")  # fmt: skip
        if not self.logits and not self.teacher:
            raise ConfigError("--logits '': then --teacher must name the text teacher")
        for name in ("judge_prompt", "judge_qa_prompt"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise MissingInput(f"--{_flag(name)} {getattr(self, name)}: no such file")
        for name in ("limit", "max_new_tokens", "judge_max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1, got {value}")
        return self


def resolve_device(device: str) -> str:
    """`auto` is cuda when torch sees a GPU, else cpu; cpu and cuda are themselves."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _flag(name: str) -> str:
    return name.replace("_", "-")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
