"""The paper's table at toy scale: does cross-modal KD reduce forgetting and the modality gap?

    .venv/bin/python bench/paper_table.py                # after `make demo`; ~25 min on 2 CPU cores
    .venv/bin/python bench/paper_table.py --features data/features_1voice   # single-voice speech (see README)

Four students trained from the same cache with the same budget (steps, batch,
learning rates, seed); every row fine-tunes the whole model on speech with CE
on the cached responses, and adds:
  (1) nothing (the baseline: speech fine-tuning, CE only, backbone trainable)
  (2) + T->T KD  (text query, teacher's distribution)
  (3) + S->T KD  (spoken query, teacher's distribution from the text query)
  (4) + both
Columns: teacher text accuracy, student text / speech exact match on the eval
split (held-out templates), forgetting (teacher text - student text), modality
gap (student text - student speech). Writes bench/results/paper_table.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from student.train import TrainConfig, train

ROWS = [
    ("(1) speech fine-tuning, CE only", dict(alpha=0.0, beta=0.0)),
    ("(2) + T->T KD", dict(alpha=0.5, beta=0.0)),
    ("(3) + S->T KD", dict(alpha=0.0, beta=0.5)),
    ("(4) + T->T and S->T KD", dict(alpha=0.5, beta=0.5)),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logits", default="data/cache")
    parser.add_argument("--features", default=None, help="speech features (default: from the cache manifest)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--align-steps", type=int, default=400, help="shared speech-alignment phase")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--backbone-lr", type=float, default=3e-4)
    parser.add_argument("--tau", type=float, default=2.0)
    parser.add_argument("--kd", default="forward_kl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctc-weight", type=float, default=1.0, help="CTC on the encoder during alignment")
    parser.add_argument("--rows", default="1,2,3,4", help="which rows to run")
    parser.add_argument("--runs", default="data/runs/paper_table", help="where the students are written")
    args = parser.parse_args()
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    wanted = {int(x) for x in args.rows.split(",")}
    runs = Path(args.runs)
    base = TrainConfig(logits=args.logits, features=args.features, out=str(runs / "aligned"),
                       steps=args.steps, align_steps=args.align_steps, ctc_weight=args.ctc_weight,
                       batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr, tau=args.tau,
                       kd=args.kd, ce_channels="S", eval_every=0, save_every=0, seed=args.seed)  # fmt: skip
    # The speech alignment phase is the same for every row (same seed, backbone frozen): run it once and
    # start every row from its checkpoint, so the rows differ only in their fine-tuning losses.
    t0 = time.monotonic()
    if args.align_steps:
        train(replace(base, stop_after=args.align_steps), progress=False)
    align_minutes = round((time.monotonic() - t0) / 60, 1)
    for i, (name, weights) in enumerate(ROWS, 1):
        if i not in wanted:
            continue
        cfg = replace(base, out=str(runs / f"row{i}"), resume=bool(args.align_steps), **weights)
        row_dir = Path(cfg.out)
        shutil.rmtree(row_dir, ignore_errors=True)
        if args.align_steps:
            shutil.copytree(runs / "aligned", row_dir)
        t0 = time.monotonic()
        r = train(cfg, progress=False)
        r.update(row=name, minutes=round((time.monotonic() - t0) / 60, 1), align_minutes=align_minutes)
        results.append(r)
        (out / "paper_table.json").write_text(json.dumps(results, indent=2))
    lines = [
        "| row | teacher text | student text | student speech | forgetting | modality gap | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['teacher_text_accuracy']:.1%} | {r['student_text_accuracy']:.1%} | "
            f"{r['student_speech_accuracy']:.1%} | {r['forgetting']:+.1%} | {r['modality_gap']:+.1%} | {r['minutes']} |"
        )
    table = "\n".join(lines)
    (out / "paper_table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
