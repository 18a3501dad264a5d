"""The training checkpoint: model, optimizer and step, written atomically (a kill mid-save leaves the previous one)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.files import atomic_write

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: Path, model, optim, step: int, cfg) -> None:
    with atomic_write(path) as tmp:
        torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": step, "config": asdict(cfg)},
                   tmp)  # fmt: skip


def load_checkpoint(path: Path, model, optim) -> int:
    """Restore model and optimizer from `path`; the step it was saved at."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    return int(state["step"])
