"""Response-only prompt logprobs inside vLLM: the LM head, log_softmax and top-k from a request's first response
position on, instead of at every prompt position.

vLLM 0.32 scores every prompt position when a request asks for `prompt_logprobs` (its only start offset,
`prompt_logprob_start`, works with fixed candidate ids only). The cache needs the response positions alone, and
real KD data is prompt-heavy, so most of that work (and the vocab x positions memory peak) is waste. This module
replaces the V1 model runner's `GPUModelRunner._get_prompt_logprobs_dict` (which vLLM's CPU runner inherits) with
a copy that skips the positions before `SamplingParams.extra_args["speechkd_logprob_start"]` - 1 (the position
that predicts the first response token), and returns rows for those positions only: the output's prompt logprobs
start there (vLLM's None, then one entry per scored position), since vLLM turns every returned row into Python
lists of k+1 entries (400 samples at 21:1 prompt:response, k=64: 4.86M entries, ~276 MB more peak memory, before;
0.22M after). A request without the key is scored and returned exactly as vLLM does. The scored rows of a step's
requests go through the LM head together, in batches bounded by the requests' memory budget (`extra_args`
MEMORY_ARG, from --logprobs-memory-gib) and on a CPU by BATCH_LOGIT_BYTES of logits (vLLM runs one small product per
request). The prompt-logprob memory is therefore bounded here, not by the engine's tokens per step: the caller
(pipeline.teacher) leaves the step size to vLLM's default for the device.

It is a vLLM general plugin (entry point `vllm.general_plugins` in pyproject.toml), so it is applied in every
engine process; `require()` applies it in this one and raises when it cannot: the copy is only applied over the
function it was written from (its source's sha256), so a vLLM whose internals changed fails at start-up instead of
mis-scoring. vLLM's V2 model runner (the default on GPUs with Triton) has its own prompt-logprob code, not
patched: `make_engine` selects the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0) when scoring response positions only.

Sampled targets (`--targets sampled`, RS-KD) are drawn here too, where the full distribution is: a request whose
`extra_args` hold `speechkd_draws` N (and `speechkd_draw_temperature` tau, `speechkd_draw_seed`) gets, per scored
position, the actual token's logprob and rank as vLLM computes them, then N ids drawn with replacement from
softmax(logits / tau) (ascending) with their logprobs, in place of the top-k: the request asks for
`prompt_logprobs=N`, so vLLM's output holds them in the top-k's slots. The draws are inverse-CDF lookups of
uniforms from numpy's generator seeded by the request's seed, one row per prompt position: the same sample gives the
same draws whatever the batch, the chunking, the partition or the device (the CDF is computed in float64: measured
identical on an H200 and on CPU; up to float rounding of the logits themselves).

Prefix caching. vLLM never reads its prefix cache for a request with prompt logprobs (`SamplingParams.
skip_reading_prefix_cache` defaults to True then): a hit would leave the rows of the cached positions unscored. So a
shared system prompt, chat template or context is recomputed for every sample. With response-only scoring the
prompt's rows are not wanted, so a hit over them is harmless, but a hit that reached into the response (two samples
with the same prompt and the same first response tokens) would leave scored rows empty. This module therefore also
caps the prefix-cache lookup (`KVCacheManager.get_computed_blocks`, run by the scheduler) of every request with
prompt logprobs at its first scored position: vLLM's own lookup, for a request shortened to that length. The
caller opts in per request (`skip_reading_prefix_cache=False`, pipeline.teacher with `--prefix-cache on`, the
default); the model runner refuses (raises) a request whose first chunk starts past its first scored position, and
pipeline.teacher checks each output's `num_cached_tokens` against it, so a hit into the response fails loudly.
"""

from __future__ import annotations

import hashlib
import inspect

import numpy as np

EXTRA_ARG = "speechkd_logprob_start"
DRAWS_ARG = "speechkd_draws"
DRAW_TEMPERATURE_ARG = "speechkd_draw_temperature"
DRAW_SEED_ARG = "speechkd_draw_seed"
MEMORY_ARG = "speechkd_logprobs_memory_bytes"  # the memory one LM-head batch of the hook may hold (--logprobs-memory-gib)
# sha256 of inspect.getsource(...) in vllm 0.32.0 (the CPU and CUDA wheels hold the same files: compared)
PATCHED_SOURCE_SHA256 = "889fdb068dfc37ddf4827e8f3af2d99ff790fbd3c77ff4a05eec1e3d0f1f560f"  # GPUModelRunner._get_prompt_logprobs_dict
PATCHED_LOOKUP_SHA256 = "77f434d88d573bfe05905a20df26ff51a86156214cf297ff9bbe5d5f05f32d07"  # KVCacheManager.get_computed_blocks
_state: dict = {"applied": False, "problem": None}


def _extra_args(request) -> dict:
    """The request's `SamplingParams.extra_args` ({} when it has none)."""
    return getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}


def first_scored_position(request) -> int:
    """The first prompt position whose next-token logprobs are computed (0: all of them)."""
    start = _extra_args(request).get(EXTRA_ARG)
    return max(int(start) - 1, 0) if start else 0


def scored_rows(num_prompt_tokens: int, first: int) -> int:
    """Rows of a request's prompt logprobs: one per scored position, `first` .. num_prompt_tokens - 2 (the last
    position predicts nothing in the prompt). With `first` 0 (no start given), vLLM's own: num_prompt_tokens - 1."""
    return max(num_prompt_tokens - 1 - first, 0)


def prefix_hit_cap(request) -> int | None:
    """The most prompt tokens a prefix-cache hit may cover for this request: its first scored position when it asks
    for prompt logprobs (0 = no hit: every row is scored), None (vLLM's own limit) when it does not."""
    params = getattr(request, "sampling_params", None)
    if params is None or params.prompt_logprobs is None:
        return None
    return first_scored_position(request)


class _HitCapped:
    """A request as the prefix-cache lookup sees it: `num_tokens` cut so that vLLM's limit (num_tokens - 1) is the
    cap; every other attribute is the request's own."""

    def __init__(self, request, cap: int):
        self._request = request
        self.num_tokens = min(request.num_tokens, cap + 1)

    def __getattr__(self, name):
        return getattr(self._request, name)


def _make_capped_lookup(original):
    def get_computed_blocks(self, request):
        # speechkd: vLLM's lookup, capped at the request's first scored position (see the module docstring)
        cap = prefix_hit_cap(request)
        return original(self, request if cap is None else _HitCapped(request, cap))

    get_computed_blocks.speechkd_response_scoring = True
    return get_computed_blocks


def draw_settings(request) -> tuple[int, float, int] | None:
    """(draws N, temperature, seed) when the request asks for sampled targets, else None (top-k)."""
    extra = _extra_args(request)
    n = extra.get(DRAWS_ARG)
    if not n:
        return None
    return int(n), float(extra.get(DRAW_TEMPERATURE_ARG, 1.0)), int(extra.get(DRAW_SEED_ARG, 0))


def draw_uniforms(seed: int, n_positions: int, draws: int) -> np.ndarray:
    """The uniforms of a request's draws, one row per prompt position: a function of the seed alone."""
    return np.random.default_rng(seed).random((n_positions, draws))


def draw_targets(logits, logprobs, token_ids, uniforms, temperature: float, gather_logprobs):
    """The sampled-targets counterpart of vLLM's `gather_logprobs` for one chunk of positions: (ids (n, N+1),
    logprobs (n, N+1), ranks (n,)), column 0 the actual token (its logprob and rank exactly as vLLM computes them),
    then N ids drawn from softmax(logits / temperature) by inverse CDF at `uniforms` (n, N), ascending, with their
    logprobs (temperature 1)."""
    import torch

    actual_ids, actual_logprobs, ranks, *_ = gather_logprobs(logprobs, 0, token_ids)
    # float64: a float32 CDF over a large vocabulary accumulates rounding that differs between devices (a GPU against
    # a CPU: some draws differed in float32, none in float64; python -m bench.draws_devices)
    cdf = torch.softmax(logits.double().div_(temperature), dim=-1).cumsum_(dim=-1)
    u = torch.as_tensor(uniforms, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    # token i is drawn iff cdf[i-1] <= u < cdf[i]: an id of probability 0 (an empty step) never is
    drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).sort(dim=-1).values
    ids = torch.cat([actual_ids, drawn.to(actual_ids.dtype)], dim=1)
    lps = torch.cat([actual_logprobs, logprobs.gather(-1, drawn)], dim=1)
    return ids, lps, ranks


# Memory of the prompt-logprob path per (scored row, vocab entry): vLLM's own path holds the logits and float32
# logprobs (6 B); sampled targets also hold float64 tempered logits and their softmax (turned into the CDF in place).
LOGPROB_BYTES_PER_VOCAB_ENTRY = 6
SAMPLED_BYTES_PER_VOCAB_ENTRY = 24
# On a CPU the LM head and log_softmax of a step's scored rows run in batches of at most this many bytes of float32
# logits (128 rows of a 32k vocabulary): on 2 CPU cores the fastest of 8-64 MiB, about twice as fast as one request
# at a time (vLLM's way: the head's weights read once per request), while larger batches fall out of the caches. On
# a GPU a batch is as large as the requests' memory budget allows (MEMORY_ARG): a small batch there reads the head's
# weights (1.2 GB for a 7B teacher's 152k x 4096 head in bf16) once per few rows. Not measured on a GPU.
BATCH_LOGIT_BYTES = 16 << 20


def batch_rows(vocab: int, memory_bytes: int | None, sampled: bool, on_cpu: bool) -> int | None:
    """Scored rows per LM-head batch: as many as `memory_bytes` holds (None: no budget given), on a CPU at most
    BATCH_LOGIT_BYTES of float32 logits; None: the whole step at once (a GPU request without a budget, whose step
    size vLLM's caller capped: --scoring full)."""
    per_row = vocab * (SAMPLED_BYTES_PER_VOCAB_ENTRY if sampled else LOGPROB_BYTES_PER_VOCAB_ENTRY)
    bounds = [memory_bytes // per_row] if memory_bytes is not None else []
    if on_cpu:
        bounds.append(BATCH_LOGIT_BYTES // (4 * vocab))
    return max(1, int(min(bounds))) if bounds else None


def row_batches(chunks: list, max_rows: int) -> list[list]:
    """Consecutive chunks (their row count at index 1) in batches of at most `max_rows` rows; a longer chunk
    alone."""
    out, rows = [], max_rows
    for c in chunks:
        if rows + c[1] > max_rows:
            out.append([])
            rows = 0
        out[-1].append(c)
        rows += c[1]
    return out


def _make_patched(runner_module):
    async_tensor_h2d = runner_module.async_tensor_h2d
    LogprobsTensors = runner_module.LogprobsTensors

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        # vLLM 0.32.0's GPUModelRunner._get_prompt_logprobs_dict, with the marked lines added or changed.
        num_prompt_logprobs_dict = self.num_prompt_logprobs
        if not num_prompt_logprobs_dict:
            return {}
        prompt_logprobs_dict = {}
        completed_prefill_reqs = []
        batches: dict = {}  # speechkd: (k, draw temperature or None) -> this step's chunks to score
        budgets: dict = {}  # speechkd: the same key -> the smallest memory budget (MEMORY_ARG) of its requests
        for req_id, num_prompt_logprobs in num_prompt_logprobs_dict.items():
            num_tokens = num_scheduled_tokens.get(req_id)
            if num_tokens is None:
                continue
            request = self.requests[req_id]
            if request.prompt_token_ids is None:
                continue
            num_prompt_tokens = len(request.prompt_token_ids)
            prompt_token_ids = async_tensor_h2d(request.prompt_token_ids, device=self.device)
            logprobs_tensors = request.in_progress_prompt_logprobs_cpu
            first = first_scored_position(request)  # speechkd
            if logprobs_tensors is None:
                if request.num_computed_tokens > first:  # speechkd: a prefix-cache hit reached scored rows
                    raise RuntimeError(f"speechkd: request {req_id} starts at prompt position "
                                       f"{request.num_computed_tokens} (a prefix-cache hit), past its first scored "
                                       f"position {first}: its rows would be left unscored. The prefix-cache cap of "
                                       "pipeline/response_scoring.py is not applied in the scheduler's process")  # fmt: skip
                # speechkd: rows for the scored positions only (first .. the last prompt position), not one per prompt
                # position: row i holds position first + i (see `scored_rows`)
                logprobs_tensors = LogprobsTensors.empty_cpu(scored_rows(num_prompt_tokens, first),
                                                             num_prompt_logprobs + 1)  # fmt: skip
                request.in_progress_prompt_logprobs_cpu = logprobs_tensors
            start_idx = request.num_computed_tokens
            start_tok = start_idx + 1
            num_remaining_tokens = num_prompt_tokens - start_tok
            if num_tokens <= num_remaining_tokens:
                num_logits = num_tokens
            else:
                num_logits = num_remaining_tokens
                completed_prefill_reqs.append(req_id)
                prompt_logprobs_dict[req_id] = logprobs_tensors
            if num_logits <= 0:
                continue
            req_idx = self.input_batch.req_id_to_index[req_id]
            offset = self.query_start_loc.np[req_idx].item()
            # speechkd: skip this chunk's positions before the first scored one
            skip = min(max(first - start_idx, 0), num_logits)
            if skip == num_logits:
                continue
            offset, start_idx, start_tok, num_logits = offset + skip, start_idx + skip, start_tok + skip, num_logits - skip
            # speechkd: this request's rows join the step's batch (scored together below)
            draws = draw_settings(request)
            uniforms = None
            if draws is not None:
                uniforms = draw_uniforms(draws[2], num_prompt_tokens - 1, draws[0])[start_idx : start_idx + num_logits]
            key = (num_prompt_logprobs, draws and draws[1])
            budget = _extra_args(request).get(MEMORY_ARG)
            if budget is not None:
                budgets[key] = min(int(budget), budgets.get(key, int(budget)))
            batches.setdefault(key, []).append(
                (offset, num_logits, prompt_token_ids[start_tok : start_tok + num_logits], uniforms, logprobs_tensors,
                 start_idx - first))  # fmt: skip
        # speechkd: the LM head, log_softmax and top-k (or draws) over the rows of several requests at once (those
        # asking for the same k and draw temperature, `batch_rows` at a time) instead of one small product per
        # request: the head's weights are read once per batch, not once per request.
        torch = runner_module.torch
        vocab, on_cpu = self.model_config.get_vocab_size(), self.device.type == "cpu"
        for (k, temperature), group in batches.items():
            max_rows = batch_rows(vocab, budgets.get((k, temperature)), temperature is not None, on_cpu)
            for chunks in row_batches(group, max_rows or sum(c[1] for c in group)):
                rows = [hidden_states[offset : offset + n] for offset, n, *_ in chunks]
                logits = self.model.compute_logits(rows[0] if len(rows) == 1 else torch.cat(rows))
                targets = torch.cat([c[2] for c in chunks]) if len(chunks) > 1 else chunks[0][2]
                if self.model_config.logprobs_mode in ("raw_logits", "processed_logits"):
                    scores = logits.to(torch.float32)
                else:
                    scores = self.sampler.compute_logprobs(logits)
                if temperature is None:
                    token_ids, logprobs, ranks, *_ = self.sampler.gather_logprobs(scores, k, targets)
                else:
                    uniforms = np.concatenate([c[3] for c in chunks])
                    token_ids, logprobs, ranks = draw_targets(logits, scores, targets, uniforms, temperature,
                                                              self.sampler.gather_logprobs)  # fmt: skip
                row = 0
                for _, n, _, _, logprobs_tensors, first_row in chunks:
                    chunk_slice, mine = slice(first_row, first_row + n), slice(row, row + n)
                    logprobs_tensors.logprob_token_ids[chunk_slice].copy_(token_ids[mine], non_blocking=True)
                    logprobs_tensors.logprobs[chunk_slice].copy_(logprobs[mine], non_blocking=True)
                    logprobs_tensors.selected_token_ranks[chunk_slice].copy_(ranks[mine], non_blocking=True)
                    row += n
        for req_id in completed_prefill_reqs:
            del num_prompt_logprobs_dict[req_id]
            self.requests[req_id].in_progress_prompt_logprobs_cpu = None
        if prompt_logprobs_dict:
            self._sync_device()
        return prompt_logprobs_dict

    _get_prompt_logprobs_dict.speechkd_response_scoring = True
    return _get_prompt_logprobs_dict


def register() -> None:
    """The plugin's entry point (run by vLLM in every engine process): apply both patches (the model runner's
    prompt logprobs, the scheduler's prefix-cache lookup) if the functions are the ones they were written from;
    otherwise leave vLLM as it is and record why (`require()` raises it). Both or neither."""
    if _state["applied"]:
        return
    try:
        from vllm.v1.core import kv_cache_manager
        from vllm.v1.worker import gpu_model_runner
    except Exception as exc:  # noqa: BLE001 - a vLLM without these modules: nothing to patch
        _state["problem"] = f"vllm.v1.worker.gpu_model_runner / vllm.v1.core.kv_cache_manager do not import ({exc})"
        return
    runner, manager = gpu_model_runner.GPUModelRunner, kv_cache_manager.KVCacheManager
    current, lookup = runner._get_prompt_logprobs_dict, manager.get_computed_blocks
    problem = (source_problem(current, "GPUModelRunner._get_prompt_logprobs_dict", PATCHED_SOURCE_SHA256)
               or source_problem(lookup, "KVCacheManager.get_computed_blocks", PATCHED_LOOKUP_SHA256))  # fmt: skip
    if problem:
        _state["problem"] = problem
        return
    if not _is_patched(current):
        runner._get_prompt_logprobs_dict = _make_patched(gpu_model_runner)
    if not _is_patched(lookup):
        manager.get_computed_blocks = _make_capped_lookup(lookup)
    _state.update(applied=True, problem=None)


def _is_patched(function) -> bool:
    """Whether `function` is this module's replacement (applied earlier in this process)."""
    return getattr(function, "speechkd_response_scoring", False)


def source_problem(function, name: str, expected: str) -> str | None:
    """Why `function` is not the one the patch replaces (its source's sha256 differs), or None (also when it is
    this module's replacement already)."""
    if _is_patched(function):
        return None
    try:
        digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
    except (OSError, TypeError) as exc:
        return f"the source of {name} cannot be read ({exc})"
    if digest != expected:
        return (f"vLLM's {name} is not the one speechkd's response-only scoring was written for (vllm 0.32.0; "
                f"source sha256 {digest[:12]}, expected {expected[:12]})")
    return None


def require() -> None:
    """Apply the patch in this process, or raise a UserError that says why it cannot and what to do."""
    from pipeline.errors import UserError

    register()
    if not _state["applied"]:
        raise UserError(f"--scoring response cannot run on this vLLM: {_state['problem']}. Use --scoring full (every "
                        f"prompt position scored, the same numbers, slower) or vllm 0.32.0")  # fmt: skip
