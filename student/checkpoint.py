"""Training checkpoints: the same for one process, DDP and FSDP, verified before they are used, the last few kept.

    <out>/checkpoints/step-00000200/
        model.pt, optim.pt          one process / DDP: rank 0 saves the whole state
        *.distcp, .metadata         FSDP: torch.distributed.checkpoint, each rank its own shards (resumed with the
                                    same world size)
        state.json                  the step, how it was saved (parallel, world size) and the run's config
        MANIFEST.json               every file's bytes and sha256, written last: a checkpoint without it is incomplete
    <out>/checkpoints/latest        the name of the newest complete checkpoint, written after it is complete

A checkpoint is written into `step-N.tmp/` and renamed into place only once every rank has written its part and the
manifest is in, then `latest` moves to it; a run killed mid-save leaves the previous checkpoint and `latest` as they
were (the `.tmp` directory is removed by the next run). `--keep-checkpoints N` keeps the N newest. `--resume` loads
`latest` after checking every file against the manifest; a corrupt or truncated checkpoint is one line naming the
file (exit 5), and `--resume previous` resumes from the one before it, never silently.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from pipeline.errors import CorruptData, MissingInput
from pipeline.files import (MANIFEST, verify_directory, write_directory_manifest, write_error, write_json_atomic,
                            write_text_atomic)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.json"
LEGACY = "checkpoint.pt"  # a single file, written by speechkd before checkpoints were directories (unverified)


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(out: Path) -> list[str]:
    """The names of the complete checkpoints (a manifest present), oldest first."""
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp") and (p / MANIFEST).exists())  # fmt: skip


def has_checkpoint(out: Path) -> bool:
    return bool(complete_checkpoints(out)) or (Path(out) / LEGACY).exists()


def _is_fsdp(model) -> bool:
    return hasattr(model, "set_requires_gradient_sync") or any(
        hasattr(m, "set_requires_gradient_sync") for m in model.modules())


def save_checkpoint(out: Path, model, optim, step: int, cfg, ranks, keep: int = 2) -> Path:
    """Write the checkpoint of `step` (every rank calls this); returns its directory. A write the machine stops (a
    full disk) is one CannotWrite on every rank, the partial checkpoint removed and the previous one left as it was:
    after each phase the ranks agree whether any failed, so none waits in a collective for another."""
    import torch

    root = checkpoints_dir(out)
    final, tmp = root / step_name(step), root / (step_name(step) + ".tmp")
    fsdp = _is_fsdp(model)
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
    _phase(ranks, tmp, lambda: tmp.mkdir(parents=True) if ranks.main else None)

    def write():
        if fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(model, optim)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        elif ranks.main:
            for name, state in (("model.pt", model.state_dict()), ("optim.pt", optim.state_dict())):
                with open(tmp / name, "wb") as fh:  # a file object: a full disk surfaces as OSError (errno 28)
                    torch.save(state, fh)

    def finalize():
        if not ranks.main:
            return
        write_json_atomic(tmp / STATE, {"step": step, "parallel": "fsdp" if fsdp else "whole",
                                        "world_size": ranks.world, "config": asdict(cfg)})  # fmt: skip
        write_directory_manifest(tmp)
        if final.exists():  # a checkpoint of this step from a run that was resumed before it: replaced
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name + "\n")
        for name in complete_checkpoints(out)[: -max(1, keep)]:
            shutil.rmtree(root / name, ignore_errors=True)

    _phase(ranks, tmp, write)
    _phase(ranks, tmp, finalize)
    return final


def _phase(ranks, tmp: Path, work) -> None:
    """Run one phase of a save on every rank, then agree: if the machine stopped any rank's write, every rank raises
    (the one that failed its own line), the partial checkpoint removed. A bug elsewhere keeps its traceback."""
    import torch

    from pipeline.errors import CannotWrite

    problem = None
    try:
        work()
    except Exception as exc:
        problem = write_error(tmp, exc)
        if problem is None:
            raise
    if ranks.all_sum(torch.tensor([1.0 if problem else 0.0], dtype=torch.float64))[0] > 0:
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise problem or CannotWrite(f"checkpoint {tmp}: another rank could not write its part (its error names the "
                                     f"file); free space and run the same command with --resume")  # fmt: skip


def remove_partial(out: Path) -> None:
    """Delete checkpoint directories a killed save left (`.tmp`)."""
    root = checkpoints_dir(out)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


def choose(out: Path, which: str = "latest") -> Path:
    """The checkpoint to resume from: `latest` (what `latest` names) or `previous` (the complete one before it)."""
    names = complete_checkpoints(out)
    root = checkpoints_dir(out)
    if not names:
        raise MissingInput(f"--resume: no checkpoint in {root} (a run saves one every --save-every steps and at the "
                           f"end)")  # fmt: skip
    pointer = root / LATEST
    latest = pointer.read_text().strip() if pointer.exists() else names[-1]
    if latest not in names:
        latest = names[-1]
    if which == "latest":
        return root / latest
    before = [n for n in names if n < latest]
    if not before:
        raise MissingInput(f"--resume previous: {root} has no checkpoint before {latest} (--keep-checkpoints keeps "
                           f"the newest N)")  # fmt: skip
    return root / before[-1]


def verify(directory: Path) -> dict:
    """Check every file of a checkpoint against its manifest; its state.json. CorruptData naming the first file that
    is missing, truncated or changed, and what to do."""
    verify_directory(directory, "its checkpoint", f"resume from the checkpoint before it with --resume previous (or "
                                                  f"delete {directory} and train again from there)")  # fmt: skip
    return json.loads((directory / STATE).read_text())


def load_checkpoint(out: Path, model, optim, ranks, which: str = "latest") -> tuple[int, Path]:
    """Restore model and optimizer from the chosen checkpoint, verified first; (its step, its directory). A legacy
    single-file checkpoint.pt (no checksum) is read as before, with a note."""
    import torch

    out = Path(out)
    if not complete_checkpoints(out) and (out / LEGACY).exists():
        if ranks.main:
            print(f"note: {out / LEGACY} is a checkpoint of an older speechkd, without checksums: not verified")
        state = torch.load(out / LEGACY, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        return int(state["step"]), out / LEGACY
    directory = choose(out, which)
    state = verify(directory)
    if state["parallel"] == "fsdp" or _is_fsdp(model):
        if state["parallel"] != "fsdp" or not _is_fsdp(model) or state["world_size"] != ranks.world:
            raise CorruptData(f"{directory} was saved with {state['parallel']} over {state['world_size']} rank(s); "
                              f"this run is {'fsdp' if _is_fsdp(model) else 'not sharded'} over {ranks.world}: resume "
                              f"with the same --parallel and world size")  # fmt: skip
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optim)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=str(directory))
        set_state_dict(model, optim, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    else:
        model.load_state_dict(torch.load(directory / "model.pt", map_location="cpu", weights_only=True))
        optim.load_state_dict(torch.load(directory / "optim.pt", map_location="cpu", weights_only=False))
    return int(state["step"]), directory


def model_state(out: Path) -> dict:
    """The model state dict of a run's newest checkpoint (one process / DDP: model.pt), verified: for tests and tools."""
    import torch

    directory = choose(Path(out))
    verify(directory)
    return torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
