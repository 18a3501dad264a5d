"""A 7B-shaped speech student on one GPU: bf16, FSDP2 with activation checkpointing and LoRA, at a 152k vocabulary.

    python -m bench.student_gpu --prepare           # here, on CPU, after make demo: the inputs (< 64 MiB), ~3 min
    python -m bench.student_gpu                     # on the GPU machine: build the student, train, report (~6 min)
    python -m bench.student_gpu --hidden 64 --layers 2 --intermediate 128 --heads 2 --kv-heads 1 --device cpu \\
        --steps 3 --batch-size 2                    # the same path on CPU, at a toy shape (tested)

--prepare makes what the GPU machine cannot (it has no vLLM and no espeak-ng): the toy teacher with its vocabulary
padded to `--vocab` ids (152064, Qwen2.5-7B's: the KD loss's softmax runs over all of them), `--samples` toy-world
prompts spoken by espeak-ng, and the teacher's cache of its own written responses (`--responses teacher`, at least
`--response-tokens` tokens each: a real assistant's length) with their top-k, under `--work`. The teacher's weights
are deleted after caching (its tokenizer stays: the student is checked against it), so `--work` can be carried.

The run builds a random-weight Qwen2-Audio-shaped student with a Qwen2.5-7B-shaped LM (hidden 3584, 28 layers, MLP
18944, 28 heads, 4 key/value heads: 7.6B parameters with its 152k embedding and head) from a config, in bf16, on
the GPU (nothing downloaded), and trains it with student/train.py under torchrun on 1 process: `--parallel fsdp
--activation-checkpointing --lora-rank 16 --precision bf16`, for `--steps` steps, no final eval. Reported: step time
(mean over the steps after the first, from metrics.csv), tokens/s (the tokens both channels process per step: typed
prompt + response, and the audio tokens + response, counted from the examples themselves), peak GPU memory
(torch.cuda.max_memory_allocated), and MFU: 6 x LM parameters x tokens/s (forward + backward; + the recomputed
forward under activation checkpointing: 8x) over `--peak-tflops` (the H200's dense bf16: 989).
Writes bench/results/student_gpu.{json,md} (a GPU run; a CPU run only prints).

On the GPU machine (the device tool): its image has torch, transformers, peft and pyarrow but not soundfile (with
cffi, pycparser) or zstandard; carry them as wheels (docs/student.md, "A 7B-shaped student on one GPU").
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.report import REPO, write_results
from pipeline.config import opt, parse_config


@dataclass
class StudentGPUBench:
    """`python -m bench.student_gpu`"""

    prepare: bool = opt(False, "make the inputs (on CPU, after make demo) instead of running")
    data: str = opt("data", "--prepare: the demo's data directory (its samples and toy teacher)")
    work: str = opt("data/gpu_bench", "the prepared inputs (carried to the GPU machine)")
    vocab: int = opt(152064, "--prepare: the teacher's padded vocabulary")
    samples: int = opt(256, "--prepare: training prompts")
    response_tokens: int = opt(200, "--prepare: shortest teacher-written response")
    top_k: int = opt(20, "--prepare: top-k cached per position")
    hidden: int = opt(3584, "the student LM's width")
    layers: int = opt(28, "the student LM's layers")
    intermediate: int = opt(18944, "the student LM's MLP width")
    heads: int = opt(28, "attention heads")
    kv_heads: int = opt(4, "key/value heads")
    lora_rank: int = opt(16, "LoRA rank (0: full fine-tuning)")
    steps: int = opt(8, "optimizer steps")
    batch_size: int = opt(8, "examples per step")
    device: str = opt("cuda", "cuda, or cpu for the toy-shape check")
    peak_tflops: float = opt(989.0, "the GPU's dense bf16 peak, for MFU")
    student_dir: str = opt("/tmp/speechkd_student_gpu", "where the random student is saved (not carried)")


def pad_vocabulary(teacher: Path, out: Path, vocab: int) -> Path:
    """The toy teacher with its BPE vocabulary padded to `vocab` ids (entries that no merge ever produces: new ids
    in the vocabulary, not added tokens, so the tokenizer file stays ~2 MB), its embeddings resized to match and its
    context to 512 positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(teacher, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    used = max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])]) + 1
    spec["model"]["vocab"].update({f"<x{i}>": i for i in range(used, vocab)})
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == vocab, (len(tok), vocab)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.config.max_position_embeddings = 512  # RoPE: room for a prompt + a real assistant's response
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prepare(cfg: StudentGPUBench) -> None:
    import pyarrow.parquet as pq

    from pipeline.samples import ingest
    from pipeline.speech import synthesize_all
    from pipeline.teacher import cache_teacher_logits
    from pipeline.teacher_config import TeacherConfig

    work, data = Path(cfg.work), Path(cfg.data)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = [r for r in pq.read_table(data / "samples" / "samples.parquet").to_pylist() if r["split"] == "train"]
    source = work / "prompts.jsonl"
    source.write_text("".join(json.dumps({k: r[k] for k in ("sample_id", "prompt", "response", "split")}) + "\n"
                              for r in rows[: cfg.samples]))  # fmt: skip
    ingest(str(source), work / "samples", progress=False)
    synthesize_all(work / "samples", work / "audio", voices=("en-us",), rates=(170,), progress=False)
    teacher = pad_vocabulary(data / "models" / "teacher", work / "teacher", cfg.vocab)
    cache_teacher_logits(TeacherConfig(teacher=str(teacher), samples=str(work / "samples"), out=str(work / "cache"),
                                       audio=str(work / "audio"), features=str(work / "audio"), top_k=cfg.top_k,
                                       responses="teacher", temperature=0.0, min_new_tokens=cfg.response_tokens,
                                       max_new_tokens=cfg.response_tokens + 56, max_model_len=512, dtype="float32",
                                       kv_cache_gib=1.0), progress=True)  # fmt: skip
    for weights in teacher.glob("*.safetensors"):
        weights.unlink()  # the student needs the teacher's tokenizer only; this keeps --work small enough to carry
    source.unlink()
    size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    print(f"prepared {work}: {len(rows[: cfg.samples])} samples, {size / 2**20:.1f} MiB; carry it to the GPU machine")


def tokens_per_example(cfg: StudentGPUBench, student: Path, n: int = 32) -> float:
    """The tokens both channels process for an example, on average over the first n: typed (prompt + response) and
    spoken (the audio placeholders the processor expanded + response)."""
    from transformers import AutoProcessor

    from student.data import SpeechLLMPrompts, StudentData

    processor = AutoProcessor.from_pretrained(student)
    data = StudentData.open(Path(cfg.work) / "cache", processor.tokenizer, prompts=SpeechLLMPrompts(processor))
    examples = [data.example(i, targets=False) for i in range(min(n, len(data)))]
    return sum(len(e.text_ids) + len(e.speech_ids) for e in examples) / len(examples)


def run(cfg: StudentGPUBench) -> dict:
    import torch

    from toy.speech_llm import SpeechLLMBuild, build

    work, student = Path(cfg.work), Path(cfg.student_dir)
    if not (work / "cache" / "manifest.json").exists():
        raise SystemExit(f"no prepared inputs at {work}: run `python -m bench.student_gpu --prepare` first (on CPU)")
    cuda = cfg.device == "cuda"
    build(SpeechLLMBuild(teacher=str(work / "teacher"), out=str(student), hidden_size=cfg.hidden, layers=cfg.layers,
                         intermediate_size=cfg.intermediate, heads=cfg.heads, kv_heads=cfg.kv_heads,
                         dtype="bfloat16" if cuda else "float32", init_device=cfg.device))  # fmt: skip
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    args = ["--logits", str(work / "cache"), "--student", str(student), "--out", str(out), "--steps", str(cfg.steps),
            "--batch-size", str(cfg.batch_size), "--warmup", "1", "--eval-every", "0", "--save-every", "0",
            "--no-final-eval", "--parallel", "fsdp", "--activation-checkpointing", "--device", cfg.device,
            "--precision", "bf16" if cuda else "fp32", "--num-workers", "4" if cuda else "0"]  # fmt: skip
    if cfg.lora_rank:
        args += ["--lora-rank", str(cfg.lora_rank)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **({} if cuda else {"OMP_NUM_THREADS": "1"})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(REPO / "student" / "train.py"), *args]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"training failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    result = json.loads((out / "result.json").read_text())
    with open(out / "metrics.csv") as fh:
        steps = [float(row["step_s"]) for row in csv.DictReader(fh)]
    step_s = sum(steps[1:]) / len(steps[1:]) if len(steps) > 1 else steps[0]  # the first step compiles and warms
    tokens = tokens_per_example(cfg, student) * cfg.batch_size
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(student).text_config.vocab_size
    lm_params = result["parameters"]  # the whole model; the audio tower is small here (1 layer)
    flops_per_token = 8 * lm_params  # forward 2 + backward 4 + the forward activation checkpointing recomputes 2
    out_row = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "hidden": cfg.hidden, "layers": cfg.layers,
        "vocab": vocab, "parameters": lm_params, "trained": result["parameters_trained"],
        "lora_rank": cfg.lora_rank, "batch_size": cfg.batch_size, "steps": cfg.steps,
        "tokens_per_step": round(tokens), "step_s": round(step_s, 3), "tokens_per_s": round(tokens / step_s, 1),
        "peak_memory_gib": round(max(result["peak_memory_mib"]) / 1024, 2),
        "mfu": round(flops_per_token * tokens / step_s / (cfg.peak_tflops * 1e12), 4) if cuda else None,
        "step_s_all": [round(s, 3) for s in steps],
    }  # fmt: skip
    return out_row


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(StudentGPUBench, argv, description=__doc__)
    if cfg.prepare:
        prepare(cfg)
        return 0
    row = run(cfg)
    print(json.dumps(row), flush=True)
    mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
    md = "\n".join([
        "| device | LM | vocab | parameters (trained) | batch | tokens/step | step s | tokens/s | peak memory GiB | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {row['device']} | {row['hidden']} x {row['layers']} | {row['vocab']} | {row['parameters'] / 1e9:.2f}B "
        f"({row['trained'] / 1e6:.1f}M, LoRA r{row['lora_rank']}) | {row['batch_size']} | {row['tokens_per_step']} | "
        f"{row['step_s']} | {row['tokens_per_s']} | {row['peak_memory_gib']} | "
        f"{mfu} |",
    ])  # fmt: skip
    if cfg.device == "cuda":  # a CPU run checks the path at a toy shape: its figures are not results
        write_results("student_gpu", [row], md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
