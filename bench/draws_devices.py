"""Sampled targets' draws (pipeline.response_scoring.draw_targets) on CUDA against CPU: the same logits and
uniforms must give the same draws, so a sample's cached draws do not depend on the machine that scored it (the CDF
is float64; in float32 some draws differ). Needs a GPU:

    python -m bench.draws_devices        # writes bench/results/draws_devices.{json,md}
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from bench.report import write_results
from pipeline.config import ConfigError, opt, parse_config
from pipeline.errors import run_cli
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


@dataclass
class DrawsDevicesBench:
    positions: int = opt(512, "positions per comparison")
    draws: int = opt(12, "ids drawn per position")
    seed: int = opt(0, "seeds the logits and the uniforms")


def main(argv: list[str] | None = None) -> int:
    args = parse_config(DrawsDevicesBench, argv, description=__doc__)
    if not torch.cuda.is_available():
        raise ConfigError("bench.draws_devices compares CUDA with CPU: no CUDA device here")
    rows = [compare(v, t, args.positions, args.draws, args.seed) for v, t in [(32000, 1.0), (151936, 1.0),
                                                                              (151936, 2.0)]]  # fmt: skip
    lines = [f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}", "",
             "| vocab | T | draws identical | positions identical | ranks identical | GPU ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['vocab']} | {r['temperature']:g} | {r['draws_identical']:.4f} | {r['positions_identical']:.4f} | "
              f"{r['ranks_identical']:.4f} | {r['gpu_ms']} |" for r in rows]  # fmt: skip
    md = "\n".join(lines)
    write_results("draws_devices", rows, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench.draws_devices"))
