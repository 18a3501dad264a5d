"""A run's records: metrics.csv (one row per optimizer step), eval.csv (one row per periodic eval), loss.png."""

from __future__ import annotations

import csv
from pathlib import Path

from student.objective import PARTS

METRIC_FIELDS = ["step", "loss", *PARTS, "lr_speech", "lr_backbone", "data_s", "step_s"]
EVAL_FIELDS = ["step", "student_text_accuracy", "student_speech_accuracy", "n_eval"]
RECORDS = {"metrics.csv": METRIC_FIELDS, "eval.csv": EVAL_FIELDS}


def append_csv(path: Path, fieldnames: list[str], row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def cut_back(out: Path, step: int) -> None:
    """A resumed run's records cut back to its checkpoint's step: the rows a killed run wrote after its last checkpoint
    go, so every step appears once and equals the uninterrupted run's row."""
    from pipeline.files import write_text_atomic

    for name, fieldnames in RECORDS.items():
        path = Path(out) / name
        if not path.exists():
            continue
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(path, buf.getvalue())


def plot(metrics_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in ("loss", "align", "ctc", "kd_T", "kd_S", "ce_T", "ce_S"):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("student training losses")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
