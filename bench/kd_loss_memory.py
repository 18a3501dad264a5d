"""Peak memory and time of the KD + CE loss at a real vocabulary: the whole logits at once vs in chunks of positions.

    python -m bench.kd_loss_memory                       # 152064 ids x 4096 positions, chunks of 512 and 2048; ~6 min
    python -m bench.kd_loss_memory --positions 1024 --chunks 256

Each variant runs in a fresh process on the same random inputs (hidden states at the response positions, an LM
head, top-64 targets): the student's LM head, then forward KL at tau 2 + CE, forward and backward. "whole" is the
loss over the (positions, vocabulary) logits at once, as the student computed it before; the chunked rows are
student.losses.response_losses (the head and loss recomputed per chunk in the backward pass). Reported: the peak
RSS above what the process held with its inputs ready (the loss's own memory), the seconds of forward + backward,
and the loss and gradient agreement with the whole-logits variant. Writes bench/results/kd_loss_memory.{json,md}.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.report import write_results
from pipeline.config import listed, opt, parse_config


@dataclass
class KdLossMemoryBench:
    vocab: int = opt(152064, "vocabulary (Qwen2.5's 152064)")
    positions: int = opt(4096, "response positions in the batch")
    hidden: int = opt(896, "hidden size (the logits' memory does not depend on it; the head's matmul does)")
    top_k: int = opt(64, "cached top-k per position")
    chunks: list[int] = listed((512, 2048), "chunk sizes to measure beside the whole logits")
    threads: int = opt(2, "torch threads")
    measure: int | None = opt(None, "internal: measure this chunk size (0: whole) in this process, print JSON")


def measure(cfg: KdLossMemoryBench, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from student.losses import forward_kl_topk, response_ce, response_losses

    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, cfg.positions, cfg.hidden, generator=g, requires_grad=True)
    weight = (torch.randn(cfg.vocab, cfg.hidden, generator=g) * cfg.hidden**-0.5).requires_grad_(True)
    mask = torch.ones(1, cfg.positions, dtype=torch.bool)
    ids = torch.randint(0, cfg.vocab, (1, cfg.positions), generator=g)
    top_ids = torch.randint(0, cfg.vocab, (1, cfg.positions, cfg.top_k), generator=g)
    top_lp = torch.randn(1, cfg.positions, cfg.top_k, generator=g).log_softmax(-1) - 1.0
    targets = {"teacher_ids": top_ids, "teacher_logprobs": top_lp}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB: inputs ready
    t = time.perf_counter()
    if chunk == 0:
        logits = F.linear(hidden, weight)
        loss = forward_kl_topk(logits, **targets, mask=mask, tau=2.0) + response_ce(logits, ids, mask)
    else:
        parts = response_losses(hidden, weight, None, mask, targets, forward_kl_topk, ids, 2.0, chunk=chunk)
        loss = parts["kd"] + parts["ce"]
    loss.backward()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"chunk": chunk, "loss": loss.item(), "grad_hidden_sum": hidden.grad.double().sum().item(),
            "grad_hidden_norm": hidden.grad.norm().item(), "grad_weight_norm": weight.grad.norm().item(),
            "peak_above_inputs_mib": round((peak - base) / 1024), "seconds": round(seconds, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(KdLossMemoryBench, argv, description=__doc__)
    if cfg.measure is not None:
        print(json.dumps(measure(cfg, cfg.measure)))
        return 0
    rows = []
    for chunk in [0, *cfg.chunks]:
        args = [sys.executable, "-m", "bench.kd_loss_memory", "--measure", str(chunk), "--vocab", str(cfg.vocab),
                "--positions", str(cfg.positions), "--hidden", str(cfg.hidden), "--top-k", str(cfg.top_k),
                "--threads", str(cfg.threads)]  # fmt: skip
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    whole = rows[0]
    logits_mib = cfg.positions * cfg.vocab * 4 / (1 << 20)
    lines = [f"vocabulary {cfg.vocab}, {cfg.positions} positions, hidden {cfg.hidden}, top-{cfg.top_k}, forward KL "
             f"(tau 2) + CE, forward + backward, {cfg.threads} threads; one fp32 (positions x vocabulary) tensor is "
             f"{logits_mib:.0f} MiB", "",
             "| loss | peak memory above the inputs (MiB) | vs whole | seconds | vs whole | loss | max gradient "
             "difference (relative) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        name = "whole logits (before)" if r["chunk"] == 0 else f"chunks of {r['chunk']} positions"
        diff = max(abs(r[k] - whole[k]) / max(abs(whole[k]), 1e-12) for k in ("grad_hidden_norm", "grad_weight_norm"))
        lines.append(f"| {name} | {r['peak_above_inputs_mib']} | {r['peak_above_inputs_mib'] / max(1, whole['peak_above_inputs_mib']):.2f}x | "
                     f"{r['seconds']} | {r['seconds'] / whole['seconds']:.2f}x | {r['loss']:.6f} | {diff:.1e} |")  # fmt: skip
    md = "\n".join(lines)
    write_results("kd_loss_memory", rows, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
