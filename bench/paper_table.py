"""The paper's table at toy scale: does cross-modal KD reduce forgetting and the modality gap?

    python -m bench.paper_table --seeds 3      # after make demo (needs data/models/encoder); ~50 min here
    python -m bench.paper_table --render bench/results/paper_table.json   # print a stored table

The recipe is configs/paper_table.toml (the student's options and the bench's rows, seeds and runs); flags override
it, and --help shows the values it sets.

Per seed: one shared speech-alignment phase (the pretrained toy encoder and its
token-CTC head learn the spoken prompts of the whole train split, read through
the ctc-embed interface, backbone frozen: the aligned model already answers
spoken questions), then four students fine-tuned from it with the same budget
(steps, batch, learning rates, seed). As in the paper, the speech fine-tuning data covers part of what
the model knows: by default the facts of half of the toy world's entities
(`--finetune-fraction`); evaluation asks about all of them. Every row
fine-tunes the whole model on speech with CE on the cached responses, and adds:
  (1) nothing (the baseline: speech fine-tuning, CE only, backbone trainable)
  (2) + T->T KD  (text query, teacher's distribution)
  (3) + S->T KD  (spoken query, teacher's distribution from the text query)
  (4) + both
Columns: teacher text accuracy, student text / speech exact match on the eval
split (held-out templates), forgetting (teacher text - student text), modality
gap (student text - student speech), and text / speech accuracy on the facts
fine-tuned on vs the others. Writes bench/results/paper_table.{json,md} (bench.report).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.report import read_results, stamp, write_results
from pipeline.config import config_from_args, listed, opt, parse_args
from pipeline.errors import run_cli
from student.config import TrainConfig
from student.train import train

ALIGNED_ROW = "(0) aligned, before fine-tuning"
ROWS = [
    ("(1) speech fine-tuning, CE only", dict(alpha=0.0, beta=0.0)),
    ("(2) + T->T KD", dict(alpha=0.5, beta=0.0)),
    ("(3) + S->T KD", dict(alpha=0.0, beta=0.5)),
    ("(4) + T->T and S->T KD", dict(alpha=0.5, beta=0.5)),
]


COLUMNS = [  # (header, result key or (key, key) for "fine-tuned / other"), every value a fraction
    ("teacher text", "teacher_text_accuracy"),
    ("student text", "student_text_accuracy"),
    ("student speech", "student_speech_accuracy"),
    ("forgetting", "forgetting"),
    ("modality gap", "modality_gap"),
    # text gap of the spoken answers to the teacher (forgetting + modality gap): unlike the modality gap it
    # does not shrink when the student's text ability collapses
    ("teacher text - student speech", "teacher_minus_speech"),
    ("speech: fine-tuned / other facts", ("finetuned_student_speech_accuracy", "not_finetuned_student_speech_accuracy")),
    ("text: fine-tuned / other facts", ("finetuned_student_text_accuracy", "not_finetuned_student_text_accuracy")),
    ("speech, held-out voice", "heldout_voice_student_speech_accuracy"),
    ("speech, held-out synthesizer", "heldout_tts_student_speech_accuracy"),
]


def _stat(values: list[float], signed: bool) -> str:
    """Mean, and with several seeds ± the sample standard deviation, in points."""
    import statistics

    mean = statistics.fmean(values)
    text = f"{mean:+.1%}" if signed else f"{mean:.1%}"
    return text + (f" ± {statistics.stdev(values) * 100:.1f}" if len(values) > 1 else "")


def render(results: list[dict]) -> str:
    """The markdown table: one line per row, each cell the mean over the seeds run (± their std)."""
    results = [{**r, "teacher_minus_speech": r["teacher_text_accuracy"] - r["student_speech_accuracy"]}
               for r in results]  # fmt: skip
    rows: dict[str, list[dict]] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    columns = [(h, k) for h, k in COLUMNS if all((k[0] if isinstance(k, tuple) else k) in r for r in results)]
    seeds = sorted({r.get("seed", 0) for r in results})
    head = "| row | " + " | ".join(h for h, _ in columns) + " | minutes |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, runs in rows.items():
        cells = []
        for header, key in columns:
            signed = key in ("forgetting", "modality_gap", "teacher_minus_speech")
            if isinstance(key, tuple):
                cells.append(" / ".join(_stat([r[k] for r in runs], False) for k in key))
            else:
                cells.append(_stat([r[key] for r in runs], signed))
        minutes = sum(r["minutes"] for r in runs) / len(runs)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    lines.append("")
    lines.append(f"seeds: {', '.join(map(str, seeds))} (mean ± sample std over {len(seeds)}, in points)")
    return "\n".join(lines)


RECIPE = "configs/paper_table.toml"
ROW_SET = ("alpha", "beta", "resume", "stop_after", "out")  # TrainConfig fields each row sets itself


@dataclass
class PaperTableBench:
    rows: list[int] = listed((1, 2, 3, 4), "which rows to run")
    seeds: int = opt(1, "run everything (alignment included) with seeds --seed, --seed+1, ...; the table gives "
                        "mean ± std")  # fmt: skip
    runs: str = opt("data/runs/paper_table", "where the students are written")
    render: str | None = opt(None, "only print the table of a paper_table.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args((TrainConfig, ROW_SET), PaperTableBench, argv=argv, description=__doc__,
                      default_config=RECIPE)  # fmt: skip
    bench = config_from_args(PaperTableBench, args)
    if bench.render:
        print(render(read_results(Path(bench.render).stem, Path(bench.render).parent)))
        return 0
    run = stamp(argv)
    results = []
    for seed in range(args.seed, args.seed + bench.seeds):
        runs = Path(bench.runs) / f"seed{seed}"
        base = config_from_args(TrainConfig, args, out=str(runs / "aligned"), seed=seed).validate()
        # The speech alignment phase is the same for every row (same seed, backbone frozen): run it once and
        # start every row from its checkpoint, so the rows differ only in their fine-tuning losses.
        t0 = time.monotonic()
        if base.align_steps:
            # the aligned model itself is row (0): evaluated before any fine-tuning (its backbone is the teacher's)
            r = train(replace(base, steps=base.align_steps), progress=False)
            r.update(row=ALIGNED_ROW, seed=seed, minutes=round((time.monotonic() - t0) / 60, 1))
            results.append(r)
            print(f"seed {seed} {ALIGNED_ROW}: text {r['student_text_accuracy']:.1%}, speech "
                  f"{r['student_speech_accuracy']:.1%} ({r['minutes']} min)", flush=True)  # fmt: skip
        align_minutes = round((time.monotonic() - t0) / 60, 1)
        for i, (name, weights) in enumerate(ROWS, 1):
            if i not in bench.rows:
                continue
            cfg = replace(base, out=str(runs / f"row{i}"), resume=bool(base.align_steps), **weights)
            row_dir = Path(cfg.out)
            shutil.rmtree(row_dir, ignore_errors=True)
            if base.align_steps:
                shutil.copytree(runs / "aligned", row_dir)
            t0 = time.monotonic()
            r = train(cfg, progress=False)
            r.update(row=name, seed=seed, minutes=round((time.monotonic() - t0) / 60, 1), align_minutes=align_minutes)
            results.append(r)
            write_results("paper_table", results, render(results), run)  # after every row: a partial table
            print(f"seed {seed} {name}: text {r['student_text_accuracy']:.1%}, speech "
                  f"{r['student_speech_accuracy']:.1%} ({r['minutes']} min)", flush=True)  # fmt: skip
    table = render(results)
    write_results("paper_table", results, table, run)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench.paper_table"))
