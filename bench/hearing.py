"""The hearing table: how well students answer spoken questions in voices, synthesizers and rooms, side by side.

    python -m bench.hearing --runs data/runs/student,data/runs/student-p50 --names "clean,perturbed 0.5"   # after make demo
    python -m bench.hearing --render bench/results/hearing.json

Each run is a training run's directory whose `benchmark/report.json` student.bench_eval wrote (`make demo` writes
data/runs/student/benchmark). One line per subset of the toy benchmark (the training voices, the held-out voice
and synthesizer, each held-out listening condition), one column of student speech exact match [95% interval] per
run, and issue 28's target beside it; then the typed figures (teacher text, student text) of each run, which speech
must not trade away. Writes bench/results/hearing.{json,md}. Runs compare only when they share a benchmark: the
same eval questions and clips (a row a run lacks is left '-').
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.report import read_results, stamp, write_results
from pipeline.config import listed, opt, parse_config
from pipeline.errors import InputMismatch, MissingInput, cli

# subset -> (what it is, issue 28's target for student speech); the toy export's subset names (toy.world)
SUBSETS = {
    "toy": ("training voices (espeak-ng grid + Festival)", ">= 77%"),
    "toy-heldout-tts": ("held-out family: Flite", ">= 60%"),
    "toy-heldout-voice": ("held-out voice: espeak-ng en-029", ">= 70%"),
    "toy-noise-20db": ("pink noise, 20 dB SNR", ">= 60%"),
    "toy-noise-10db": ("pink noise, 10 dB SNR", ">= 40%"),
    "toy-reverb": ("reverberation (held-out rooms)", ">= 60%"),
    "toy-telephone": ("telephone band", ">= 40%"),
}


@dataclass
class HearingBench:
    runs: list[str] = listed((), "training runs (directories with benchmark/report.json), one column each")
    names: list[str] = listed((), "a column name per run (default: each run's directory name)")
    render: str | None = opt(None, "only print the table of a hearing.json")


def read_run(run: str, name: str) -> dict:
    path = Path(run) / "benchmark" / "report.json"
    if not path.exists():
        raise MissingInput(f"{path}: no benchmark report; run `python -m student.bench_eval --student {run}/final` "
                           f"first (make demo does, for data/runs/student)")  # fmt: skip
    report = json.loads(path.read_text())
    try:
        subsets = {s["subset"]: s for s in report["subsets"]}
    except (KeyError, TypeError) as exc:
        raise InputMismatch(f"{path}: not a student.bench_eval report (no subsets list)") from exc
    return {"run": run, "name": name, "subsets": {
        k: {field: {"score": s[field]["score"], "ci95": s[field]["ci95"], "n": s[field]["n"]}
            for field in ("student_speech", "student_text", "teacher_text")} for k, s in subsets.items()}}  # fmt: skip


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['score']:.1%} [{lo:.1%}, {hi:.1%}]"


def render(results: list[dict]) -> str:
    names = [r["name"] for r in results]
    subsets = [s for s in SUBSETS if any(s in r["subsets"] for r in results)]
    subsets += sorted({s for r in results for s in r["subsets"]} - set(subsets))  # another benchmark's, as they are
    lines = ["Student speech, exact match [95% interval], per subset of the benchmark:", "",
             "| subset | " + " | ".join(names) + " | target |", "|---|" + "---|" * (len(names) + 1)]  # fmt: skip
    for s in subsets:
        what, target = SUBSETS.get(s, (s, ""))
        cells = [_cell(r["subsets"].get(s, {}).get("student_speech")) for r in results]
        lines.append(f"| {what} (`{s}`) | " + " | ".join(cells) + f" | {target} |")
    typed = next((s for s in subsets if all(s in r["subsets"] for r in results)), None)
    if typed:
        lines += ["", f"Typed (`{typed}`'s questions): " + "; ".join(
            f"{r['name']}: teacher text {r['subsets'][typed]['teacher_text']['score']:.1%}, student text "
            f"{r['subsets'][typed]['student_text']['score']:.1%}" for r in results) + "."]  # fmt: skip
    return "\n".join(lines)


@cli("bench.hearing")
def main(argv: list[str] | None = None) -> int:
    bench = parse_config(HearingBench, argv, description=__doc__)
    if bench.render:
        print(render(read_results(Path(bench.render).stem, Path(bench.render).parent)))
        return 0
    if not bench.runs:
        raise MissingInput("no runs: give one or more training runs, e.g. data/runs/student (see --help)")
    if bench.names and len(bench.names) != len(bench.runs):
        raise InputMismatch(f"--names has {len(bench.names)} names for {len(bench.runs)} runs; give one per run")
    names = bench.names or [Path(r).name for r in bench.runs]
    results = [read_run(run, name) for run, name in zip(bench.runs, names, strict=True)]
    table = render(results)
    write_results("hearing", results, table, run=stamp(argv, "bench.hearing"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
