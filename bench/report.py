"""Benchmark results as artifacts: every bench writes its table as Markdown + JSON under bench/results/.

Both files carry the command that made them, the date, the commit (with `+dirty` when the tree had uncommitted
changes) and the machine (CPU model, cores, memory, GPU), so a figure in the docs can always be traced and re-made:
docs link to these files instead of copying numbers by hand, and re-running a bench rewrites its own files.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipeline import cpu_isa
from pipeline.files import write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def commit() -> str:
    """The checkout's commit, `+dirty` when tracked files differ from it; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict:
    """What the figures were measured on."""
    cpu, flags = cpu_isa.cpu_info()
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    except (ValueError, OSError):
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "gpu": gpu,
            "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "python": platform.python_version(),
            "cpu_arithmetic": cpu_isa.in_effect()}  # fmt: skip


def command(argv: list[str] | None = None, module: str | None = None) -> str:
    """The command line that re-makes a result: `python -m <module> <args>`."""
    argv = sys.argv[1:] if argv is None else argv
    module = module or Path(sys.argv[0]).stem
    return "python -m " + " ".join(shlex.quote(a) for a in [module if "." in module else f"bench.{module}", *argv])


def stamp(argv: list[str] | None = None, module: str | None = None) -> dict:
    return {"command": command(argv, module), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": commit(),
            "machine": machine()}  # fmt: skip


def write_results(name: str, results, markdown: str, run: dict | None = None, out_dir: Path = RESULTS) -> Path:
    """bench/results/<name>.json ({"bench", run stamp, "results"}) and <name>.md (the stamp, then `markdown`);
    `run`: the stamp (default: this process's command line, now). Returns the Markdown file's path."""
    run = run or stamp()
    m = run["machine"]
    where = f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB" + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
    where += f", CPU arithmetic {m['cpu_arithmetic']}" if m.get("cpu_arithmetic") else ""
    write_json_atomic(Path(out_dir) / f"{name}.json", {"bench": name, **run, "results": results})
    head = (f"<!-- written by {run['command']}; re-run it to update this file -->\n\n"
            f"- command: `{run['command']}`\n- date: {run['date']}\n- commit: {run['commit']}\n- machine: {where}\n\n")  # fmt: skip
    md = Path(out_dir) / f"{name}.md"
    write_text_atomic(md, head + markdown.rstrip() + "\n")
    return md


def read_results(name: str, out_dir: Path = RESULTS) -> list:
    """The rows a bench wrote last ([] when it never ran)."""
    path = Path(out_dir) / f"{name}.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return data["results"] if isinstance(data, dict) else data  # a list: written before the stamp existed
