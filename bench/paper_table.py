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
import sys
import time
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
    parser.add_argument("--rows", default="1,2,3,4", help="which rows to run")
    args = parser.parse_args()
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    wanted = {int(x) for x in args.rows.split(",")}
    for i, (name, weights) in enumerate(ROWS, 1):
        if i not in wanted:
            continue
        cfg = TrainConfig(logits=args.logits, features=args.features, out=f"data/runs/paper_table/row{i}",
                          steps=args.steps, align_steps=args.align_steps,
                          batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr, tau=args.tau,
                          kd=args.kd, ce_channels="S", eval_every=0, save_every=0, seed=args.seed, **weights)  # fmt: skip
        t0 = time.monotonic()
        r = train(cfg, progress=False)
        r.update(row=name, minutes=round((time.monotonic() - t0) / 60, 1))
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
