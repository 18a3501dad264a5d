"""What several benches share: the toy-world samples and the toy teacher they measure on, made once."""

from __future__ import annotations

from pathlib import Path

from pipeline import schemas

WORK = Path("data/bench")


def toy_samples(samples_dir: Path = WORK / "samples") -> Path:
    """The embedded toy world ingested into `samples_dir` (once)."""
    if not (Path(samples_dir) / "samples.parquet").exists():
        from toy.world import ingest_world

        ingest_world(samples_dir)
    return Path(samples_dir)


def toy_teacher(samples_dir: Path, teacher: Path = schemas.TEACHER_DIR) -> Path:
    """The embedded toy teacher (its tokenizer and chat template serve the random models too), built once."""
    if not (Path(teacher) / "config.json").exists():
        from toy.teacher import ToyTeacherConfig, build_teacher

        print("bench: building the toy teacher first (python -m toy.teacher)")
        build_teacher(samples_dir, teacher, ToyTeacherConfig())
    return Path(teacher)
