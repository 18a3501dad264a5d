"""Students that do not fit one GPU: memory per rank and step time of DDP vs FSDP2, with and without activation
checkpointing, full fine-tuning vs LoRA, side by side in one run; and what fits on 80 GB GPUs at 0.5B/3B/7B.

    python -m bench.student_scale                         # after make demo; 2 gloo ranks on this CPU; ~8 min
    python -m bench.student_scale --hidden 512 --layers 8 --steps 6

Measured: a random-weight Qwen2-Audio-shaped student built from a config (python -m toy.speech_llm: the LM at
`--hidden` x `--layers`, the toy teacher's tokenizer, nothing downloaded) trained from the demo's cache for `--steps`
steps by 2 gloo ranks under torchrun, once per setting, each in fresh processes: peak RSS per rank (the largest
rank's), the mean step time, and the parameter + gradient + optimizer bytes each rank holds by the accounting below
(fp32 weights; AdamW: 8 B of state per trained parameter; FSDP divides all of it by the ranks). The ratio the
FSDP issue asked for: FSDP's parameter + optimizer memory per rank over DDP's, at 2 ranks.

Computed (the same accounting, for Qwen2.5-0.5B/3B/7B-shaped LMs on 1, 2 and 8 GPUs of 80 GB): per rank, weights +
gradients + AdamW state (fp32 master weights, bf16 compute: FSDP2's MixedPrecisionPolicy), divided by the ranks
under FSDP, plus activations per example of `--tokens` tokens: without activation checkpointing 34 x hidden bytes per
token per layer (bf16, flash attention; Korthikanti et al. 2022), with it 2 x hidden per token per layer (each
block's input) plus one block's 34 x hidden; plus the loss's chunk of logits (student.losses.response_losses). The
largest micro-batch that fits in 90% of the GPU's memory is given; 0 means it does not fit. Audio towers (~0.6B in
Qwen2-Audio, frozen) and fragmentation are not counted: a plan to check on the machine, not a promise.

Writes bench/results/student_scale.{json,md}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.report import REPO, write_results
from pipeline.config import listed, opt, parse_config

GIB = 1 << 30
# Qwen2.5 LMs: (parameters, hidden, layers, intermediate, vocabulary)
SHAPES = {"0.5B": (0.49e9, 896, 24, 4864, 151936), "3B": (3.09e9, 2048, 36, 11008, 151936),
          "7B": (7.62e9, 3584, 28, 18944, 152064)}  # fmt: skip


@dataclass
class StudentScaleBench:
    data: str = opt("data", "the demo's data directory (its cache and audio)")
    hidden: int = opt(1024, "the measured student's LM width")
    layers: int = opt(8, "the measured student's LM layers")
    steps: int = opt(6, "optimizer steps per setting")
    batch_size: int = opt(8, "global batch")
    lora_rank: int = opt(8, "rank of the LoRA settings")
    settings: list[str] = listed(("ddp", "fsdp", "ddp+ac", "fsdp+ac", "ddp+lora", "fsdp+lora"),
                                 "settings to measure: ddp|fsdp, +ac, +lora")  # fmt: skip
    ranks: int = opt(2, "torchrun processes")
    tokens: int = opt(1024, "tokens per example in the computed table (prompt + audio tokens + response)")
    gpu_gib: float = opt(80.0, "GPU memory in the computed table")
    loss_chunk: int = opt(512, "the loss's chunk (positions) in the computed table")


def accounting(trained: float, frozen: float, ranks: int, fsdp: bool) -> float:
    """Bytes per rank of fp32 weights, gradients and AdamW state (trained: 4 + 4 + 8 B a parameter; frozen: 4 B),
    all of it divided by the ranks under FSDP."""
    total = trained * 16 + frozen * 4
    return total / ranks if fsdp else total


def activation_bytes(hidden: int, layers: int, tokens: int, checkpointing: bool) -> float:
    per_layer = 34 * hidden * tokens  # bf16 activations a block keeps for its backward
    return (2 * hidden * tokens * layers + per_layer) if checkpointing else per_layer * layers


def plan(size: str, gpus: int, fsdp: bool, lora: int, checkpointing: bool, tokens: int, gpu_gib: float,
         chunk: int) -> dict:  # fmt: skip
    params, hidden, layers, inter, vocab = SHAPES[size]
    if lora:  # adapters on q, k, v, o, gate, up, down of every layer: rank x (in + out) each
        per_layer = lora * (4 * 2 * hidden + 3 * (hidden + inter))
        trained, frozen = per_layer * layers, params
    else:
        trained, frozen = params, 0.0
    static = accounting(trained, frozen, gpus, fsdp)
    if fsdp:  # the bf16 copy of the blocks being gathered (the current and the prefetched one)
        static += 2 * 2 * params / layers
    logits = chunk * vocab * 4 * 3  # a chunk's logits, log_softmax and gradient
    per_example = activation_bytes(hidden, layers, tokens, checkpointing)
    room = 0.9 * gpu_gib * GIB - static - logits
    return {"size": size, "gpus": gpus, "parallel": "fsdp" if fsdp else "ddp", "lora": lora,
            "activation_checkpointing": checkpointing, "static_gib": round(static / GIB, 1),
            "per_example_gib": round(per_example / GIB, 2),
            "max_micro_batch": max(0, int(room // per_example)) if room > 0 else 0}  # fmt: skip


def measure(cfg: StudentScaleBench, setting: str, student: Path, work: Path) -> dict:
    parts = setting.split("+")
    out = work / setting.replace("+", "-")
    shutil.rmtree(out, ignore_errors=True)
    args = ["--logits", str(Path(cfg.data) / "cache"), "--student", str(student), "--out", str(out), "--steps",
            str(cfg.steps), "--batch-size", str(cfg.batch_size), "--warmup", "1", "--eval-every", "0", "--save-every",
            "0", "--num-workers", "1", "--device", "cpu", "--no-final-eval", "--parallel", parts[0],
            "--no-freeze-adapter"]  # fmt: skip
    if "ac" in parts:
        args.append("--activation-checkpointing")
    if "lora" in parts:
        args += ["--lora-rank", str(cfg.lora_rank)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.ranks}",
           str(REPO / "student" / "train.py"), *args]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"{setting}: {r.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    trained, total = result["parameters_trained"], result["parameters"]
    return {"setting": setting, "parallel": parts[0], "activation_checkpointing": "ac" in parts,
            "lora": "lora" in parts, "parameters": total, "trained": trained,
            "peak_rss_mib_per_rank": result["peak_memory_mib"], "step_s": round(result["step_s_mean"], 3),
            "param_optim_mib_per_rank": round(accounting(trained, total - trained, cfg.ranks,
                                                         parts[0] == "fsdp") / (1 << 20), 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(StudentScaleBench, argv, description=__doc__)
    from toy.speech_llm import SpeechLLMBuild, build

    work = Path(cfg.data) / "bench" / "student_scale"
    student = build(SpeechLLMBuild(teacher=str(Path(cfg.data) / "models" / "teacher"), out=str(work / "student"),
                                   hidden_size=cfg.hidden, layers=cfg.layers))  # fmt: skip
    rows = []
    for setting in cfg.settings:
        rows.append(measure(cfg, setting, student, work))
        print(json.dumps(rows[-1]), flush=True)
    by = {r["setting"]: r for r in rows}
    lines = [f"measured: a Qwen2-Audio-shaped student, LM {cfg.hidden} x {cfg.layers} ({rows[0]['parameters'] / 1e6:.1f}M "
             f"parameters), {cfg.ranks} gloo ranks on CPU, global batch {cfg.batch_size}, {cfg.steps} steps", "",
             "| setting | trained parameters | params + grads + AdamW per rank (MiB, accounted) | peak RSS per rank "
             "(MiB, measured) | step s |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['setting']} | {r['trained'] / 1e6:.2f}M | {r['param_optim_mib_per_rank']} | "
                     f"{max(r['peak_rss_mib_per_rank'])} | {r['step_s']} |")  # fmt: skip
    for base, other in (("ddp", "fsdp"), ("ddp+ac", "fsdp+ac"), ("ddp+lora", "fsdp+lora"), ("ddp", "ddp+ac"),
                        ("fsdp", "fsdp+ac")):  # fmt: skip
        if base in by and other in by:
            a, b = by[base], by[other]
            lines.append(f"\n{other} / {base}: params + optimizer per rank "
                         f"{b['param_optim_mib_per_rank'] / a['param_optim_mib_per_rank']:.2f}x, peak RSS "
                         f"{max(b['peak_rss_mib_per_rank']) / max(a['peak_rss_mib_per_rank']):.2f}x, step time "
                         f"{b['step_s'] / a['step_s']:.2f}x")  # fmt: skip
    table = [plan(size, gpus, fsdp, lora, ac, cfg.tokens, cfg.gpu_gib, cfg.loss_chunk)
             for size in SHAPES for lora in (0, 16) for fsdp in (False, True) for ac in (False, True)
             for gpus in (1, 2, 8)]  # fmt: skip
    lines += ["", f"computed: Qwen2.5-shaped LMs on GPUs of {cfg.gpu_gib:g} GB, examples of {cfg.tokens} tokens; "
              "largest micro-batch per GPU (0: does not fit); static = weights + grads + AdamW per GPU", "",
              "| LM | training | AC | 1 GPU: static GiB / micro-batch | 2 GPUs | 8 GPUs |", "|---|---|---|---|---|---|"]  # fmt: skip
    for size in SHAPES:
        for lora in (0, 16):
            for fsdp in (False, True):
                for ac in (False, True):
                    cells = [next(p for p in table if (p["size"], p["gpus"], p["parallel"], p["lora"],
                                                       p["activation_checkpointing"]) == (size, g, "fsdp" if fsdp
                                                                                          else "ddp", lora, ac))
                             for g in (1, 2, 8)]  # fmt: skip
                    what = f"{'FSDP' if fsdp else 'DDP'}, {'LoRA r16' if lora else 'full'}"
                    lines.append(f"| {size} | {what} | {'yes' if ac else 'no'} | "
                                 + " | ".join(f"{c['static_gib']} / {c['max_micro_batch']}" for c in cells) + " |")
    md = "\n".join(lines)
    write_results("student_scale", {"measured": rows, "computed": table}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
