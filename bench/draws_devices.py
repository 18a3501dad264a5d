"""Sampled targets' draws (pipeline.response_scoring.draw_targets) on CUDA against CPU: the same logits and
uniforms must give the same draws, so a sample's cached draws do not depend on the machine that scored it (the CDF
is float64; in float32 0.15-1.9% of draws differed, measured on an H200). Needs a GPU:

    python bench/draws_devices.py        # writes bench/results/draws_devices.json

Measured on an NVIDIA H200 (torch 2.11+cu130) against its host CPU: every draw and rank identical at 32k and 152k
ids, T = 1 and 2; 1.3-3.1 ms per 512 positions x 12 draws on the GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.response_scoring import draw_targets, draw_uniforms


def gather_actual(logprobs, k, token_ids):
    """vLLM's Sampler.gather_logprobs at k = 0: the actual token, its logprob and its rank."""
    actual = logprobs.gather(-1, token_ids[:, None])
    return token_ids[:, None], actual, (logprobs >= actual).sum(-1)


def compare(vocab: int, temperature: float, positions: int = 512, draws: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(positions, vocab, generator=g) * 4
    logprobs = logits.log_softmax(-1)
    targets = torch.randint(0, vocab, (positions,), generator=g)
    uniforms = draw_uniforms(1234, positions, draws)
    cpu_ids, _, cpu_ranks = draw_targets(logits, logprobs, targets, uniforms, temperature, gather_actual)
    on_gpu = (logits.cuda(), logprobs.cuda(), targets.cuda(), uniforms, temperature, gather_actual)
    draw_targets(*on_gpu)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gpu_ids, _, gpu_ranks = draw_targets(*on_gpu)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    gpu_ids, gpu_ranks = gpu_ids.cpu(), gpu_ranks.cpu()
    return {
        "vocab": vocab,
        "temperature": temperature,
        "draws_identical": (gpu_ids == cpu_ids).float().mean().item(),
        "positions_identical": (gpu_ids == cpu_ids).all(1).float().mean().item(),
        "ranks_identical": (gpu_ranks == cpu_ranks).float().mean().item(),
        "gpu_ms": round(ms, 2),
    }


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/draws_devices.py compares CUDA with CPU: no CUDA device here")
    rows = [compare(v, t) for v, t in [(32000, 1.0), (151936, 1.0), (151936, 2.0)]]
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    out = Path("bench/results/draws_devices.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
