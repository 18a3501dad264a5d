"""Helpers the tests share (fixtures are in conftest.py): the tiny fixtures' sizes, the tiny teacher's stage
config, and how a command line is run and its one-line error checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from toy.teacher import ToyTeacherConfig
from toy.world import ToyWorldConfig

REPO = Path(__file__).resolve().parents[1]
TINY_WORLD = ToyWorldConfig(n_entities=6, n_additions=6, seed=1)
TINY_TEACHER = ToyTeacherConfig(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1,
    max_epochs=3, eval_every=3, target_accuracy=1.1, min_accuracy=0.0, max_minutes=2, batch_size=16,
)  # fmt: skip


def tiny_teacher_config(model: Path, **kw):
    """The teacher stage's config for the tiny teacher (fp32, a short context, a small KV cache, KV blocks of 32
    tokens: prefix-cache hits fit in the 128-token context)."""
    from pipeline.teacher_config import TeacherConfig

    return TeacherConfig(**{"teacher": str(model), "dtype": "float32", "max_model_len": 128, "kv_cache_gib": 0.25,
                            "block_size": 32, **kw})  # fmt: skip


def run(args: list[str], cwd=REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command line of this project (`[module or script, args...]`) in a fresh Python process."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def torchrun(script_args: list[str], nproc: int, cwd=REPO, timeout: int = 600, check: bool = True,
             script: Path = REPO / "student" / "train.py") -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc student/train.py ...` (gloo on CPU, one thread a rank)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           *script_args]  # fmt: skip
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """A user error: exit `code`, no traceback, and its last line holding every needle; that line."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, last)
    return last


SYSTEM_PROMPT = "Answer in one short sentence."


def chat_rows(rows: list[dict], n: int = 8) -> list[dict]:
    """Conversations made of the tiny world: a system prompt, then two question-answer rounds (two rows each)."""
    out = []
    for i in range(n):
        a, b = rows[2 * i], rows[2 * i + 1]
        out.append({"sample_id": f"chat-{i}", "split": "train", "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["response"]},
            {"role": "user", "content": b["prompt"]}, {"role": "assistant", "content": b["response"]}]})  # fmt: skip
    return out
