"""The teacher stage's one config: every option of `python -m pipeline.teacher` and of the cache-teacher flow's
caching step, declared once (type, default, choices, help).

`TeacherConfig` is the single source: `pipeline.teacher`'s flags are generated from it, the flow's parameters
(and so a served deployment's parameter schema and defaults) are its fields, and `validate` checks every option
before any engine starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import schemas
from pipeline.chat import TURNS
from pipeline.config import ConfigError, check_choices, flag, opt


DTYPES = ("auto", "float32", "bfloat16", "float16")
EXECUTOR_BACKENDS = ("uni", "mp", "ray")


@dataclass
class TeacherConfig:
    # --- inputs and output
    samples: str = opt(str(schemas.SAMPLES_DIR), "samples directory")
    out: str = opt(str(schemas.CACHE_DIR), "cache directory")
    features: str = opt(str(schemas.FEATURES_DIR), "speech features of these samples (recorded in the cache "
                                                   "manifest for the student)")  # fmt: skip
    audio: str = opt(str(schemas.AUDIO_DIR), "the speech audio of these samples (recorded in the manifest: a student "
                                             "that runs its own processor on the audio reads it)")  # fmt: skip
    split: str | None = opt(None, "cache only this split (default: every split)")
    limit: int | None = opt(None, "cache only the first N samples (smoke runs)")
    # --- the teacher
    teacher: str | None = opt(None, "the teacher: a local HF model dir or a Hugging Face id (default: the embedded "
                                    f"toy teacher, {schemas.TEACHER_DIR})", aliases=("--model",))  # fmt: skip
    dtype: str = opt("auto", "auto = the checkpoint's own dtype; a lower one is an explicit choice (fingerprinted)",
                     DTYPES)  # fmt: skip
    max_model_len: int | None = opt(None, "context length (default: min(the model's, 4096)); longer samples are "
                                          "rejects or, with --too-long truncate, cut")  # fmt: skip
    seed: int = opt(0, "engine seed (teacher-written responses with --temperature > 0) and, with --targets sampled, "
                       "of the draws (with each sample's content: the same sample always gets the same draws)")  # fmt: skip
    # --- what is cached
    targets: str = opt("topk", "what is cached per response position: topk = the --top-k most likely ids and their "
                                "logprobs; sampled = --draws ids drawn from the teacher's full distribution at "
                                "--draw-temperature, kept as distinct ids + counts (RS-KD: unbiased, fewer bytes)",
                       schemas.CACHE_TARGETS)  # fmt: skip
    top_k: int = opt(64, "--targets topk: logprobs kept per response position")
    draws: int = opt(12, "--targets sampled: ids drawn per response position (with replacement, at most 255)")
    draw_temperature: float = opt(1.0, "--targets sampled: temperature of the distribution drawn from (the student "
                                       "trains at this KD temperature)")  # fmt: skip
    responses: str = opt("dataset", "score the samples' responses (dataset), or have the teacher write the final "
                                    "assistant turn: teacher = in one pass, its top-k taken as it generates; "
                                    "teacher-rescored = generate, then score the written ids in a second pass (what "
                                    "--targets sampled needs: its draws are taken in the scoring pass). The written "
                                    "text is kept in the cache rows; samples.parquet is never changed",
                         ("dataset", "teacher", "teacher-rescored"))  # fmt: skip
    turns: str = opt("last", "which assistant turns of a conversation are distilled: last = the final one, all = "
                             "every one (each its own span of the cached row)", TURNS)  # fmt: skip
    max_new_tokens: int = opt(256, "--responses teacher: longest response written (one that reaches it is cached "
                                   "without an end of turn, and counted)")  # fmt: skip
    min_new_tokens: int = opt(0, "--responses teacher: the end of turn is held back until this many tokens are "
                                 "written (vLLM's min_tokens; the cached top-k stay the raw distribution's); for "
                                 "benchmarks at an assistant's response length")  # fmt: skip
    temperature: float = opt(0.0, "--responses teacher: sampling temperature (0 = greedy); the cached top-k are "
                                  "the raw distribution's (temperature 1) whatever it is")  # fmt: skip
    too_long: str = opt("reject", "a sample longer than the context: a reject, or its response cut",
                        ("reject", "truncate"))  # fmt: skip
    logprob_step: float = opt(1 / 32, "quantization step of the cached logprobs (nats; worst-case error step/2)")
    scoring: str = opt("response", "where vLLM applies the LM head, log_softmax and top-k: response = from the "
                                   "first response position on (pipeline/response_scoring.py, a vLLM plugin), full = "
                                   "every prompt position, as vLLM does (the same numbers, more work)",
                       ("response", "full"))  # fmt: skip
    prefix_cache: bool = opt(True, "--scoring response: reuse vLLM's prefix cache over prompt positions (a shared "
                                   "system prompt, chat template or context is computed once, not per sample); hits "
                                   "are capped at the first response position, so every scored row is computed "
                                   "(--no-prefix-cache: recompute every prompt, as vLLM does with prompt logprobs)")  # fmt: skip
    # --- the engine (vLLM)
    kv_cache_gib: float = opt(2.0, "CPU: KV cache size (GPU: see --gpu-memory-utilization)")
    gpu_memory_utilization: float = opt(0.85, "GPU: fraction of GPU memory vLLM may use")
    tensor_parallel_size: int = opt(1, "GPUs one engine's layers are split over (GPU only; a worker claims this many)")
    pipeline_parallel_size: int = opt(1, "pipeline stages of one engine (GPU only)")
    logprobs_memory_gib: float = opt(1.0, "memory of the prompt-logprob path at once: rows x vocab x 6 B (24 B with "
                                          "--targets sampled) <= this; with --scoring response it bounds each "
                                          "LM-head batch (on CPU also <= 16 MiB of logits, faster there), with "
                                          "--scoring full the tokens per step")  # fmt: skip
    max_batched_tokens: int | None = opt(None, "tokens the engine computes per step (default: with --scoring "
                                               "response, vLLM's default for the device, e.g. 16384 on an H100, "
                                               "4096 on CPU; with --scoring full, what --logprobs-memory-gib "
                                               "holds)")  # fmt: skip
    max_num_seqs: int = opt(256, "sequences the engine schedules at once")
    block_size: int | None = opt(None, "KV cache block size in tokens; prefix-cache hits are whole blocks, so a "
                                       "shared prefix shorter than a block is recomputed (default: vLLM's, 128 on "
                                       "CPU, 16 on GPU; CPU attention takes multiples of 32)")  # fmt: skip
    enforce_eager: bool | None = opt(None, "no CUDA graphs / compilation (default: on CPU, where it starts faster)")
    executor_backend: str | None = opt(None, "vLLM's distributed executor: uni | mp | ray (default: uni on CPU, "
                                             "vLLM's choice on GPU)")  # fmt: skip
    # --- cache layout and the work split
    partitions: int | None = opt(None, "hash partitions of the cache, fixed for its life: sample -> "
                                       "sha256(sample_id) mod P; each is written by one worker at a time (default: "
                                       "the existing cache's; a new one: the flow's --workers, else 1)")  # fmt: skip
    partition: int | None = opt(None, "score only this partition, 0..P-1 (one worker's share; default: all of "
                                      "them, one after the other)")  # fmt: skip
    group_size: int = opt(512, "samples per submission to vLLM")
    rows_per_shard: int = opt(1024, "cache rows per Parquet shard")
    overwrite: bool = opt(False, "replace a cache made by another teacher setup (or with another --partitions)")
    verify: bool = opt(True, "check every shard's sha256 against the manifest before appending (--no-verify: skip)")

    @property
    def model(self) -> str:
        """The teacher to load: --teacher, else the embedded toy teacher's directory."""
        return self.teacher or str(schemas.TEACHER_DIR)

    @property
    def samples_dir(self) -> Path:
        return Path(self.samples)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def features_dir(self) -> Path:
        return Path(self.features)

    @property
    def audio_dir(self) -> Path:
        return Path(self.audio)

    def validate(self, require_teacher: bool = True) -> "TeacherConfig":
        """Every option checked before any engine starts: ConfigError naming the option and what is allowed.
        `require_teacher`: the embedded toy teacher must be built already (the flow builds it). What this machine's
        vLLM can run is pipeline.engine.check_platform's."""
        check_choices(self)
        positive = ("top_k", "max_new_tokens", "group_size", "rows_per_shard", "tensor_parallel_size",
                    "pipeline_parallel_size", "max_num_seqs", "logprob_step", "kv_cache_gib", "logprobs_memory_gib")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("limit", "partitions", "max_model_len", "block_size", "max_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{flag(name)} must be >= 1, got {value}")
        if not 1 <= self.draws <= 255:
            raise ConfigError(f"--draws must be in 1..255 (counts are stored as uint8), got {self.draws}")
        if self.draw_temperature <= 0:
            raise ConfigError(f"--draw-temperature must be > 0, got {self.draw_temperature}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"--min-new-tokens must be in 0..--max-new-tokens ({self.max_new_tokens}), got "
                              f"{self.min_new_tokens}")  # fmt: skip
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.executor_backend is not None and self.executor_backend not in EXECUTOR_BACKENDS:
            raise ConfigError(f"--executor-backend {self.executor_backend!r} is not one of: "
                              f"{', '.join(EXECUTOR_BACKENDS)}")  # fmt: skip
        if self.partition is not None:
            if self.partition < 0:
                raise ConfigError(f"--partition must be >= 0, got {self.partition}")
            if self.partitions is not None and self.partition >= self.partitions:
                raise ConfigError(f"--partition {self.partition} is not one of 0..{self.partitions - 1} "
                                  f"(--partitions {self.partitions})")  # fmt: skip
        if require_teacher and self.teacher is None and not Path(self.model).is_dir():
            raise ConfigError(f"no teacher at {self.model} (the embedded toy teacher's place): build it with "
                              f"`python -m toy.teacher` or the cache-teacher flow, or pass --teacher")  # fmt: skip
        return self

    @property
    def writes_responses(self) -> bool:
        """Whether the teacher writes the final assistant turn (--responses teacher or teacher-rescored)."""
        return self.responses != "dataset"

    @property
    def responses_mode(self) -> str:
        """How the responses are made, as the fingerprint records it: sampled targets are drawn in the scoring
        pass, so with --targets sampled teacher-written responses are generated, then re-scored."""
        if self.responses == "teacher" and self.targets == "sampled":
            return "teacher-rescored"
        return self.responses

    @property
    def logprobs_per_position(self) -> int:
        """What each scored position asks vLLM for besides the actual token: k top ids, or N draws."""
        return self.draws if self.targets == "sampled" else self.top_k

    @property
    def gpus_per_engine(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size
