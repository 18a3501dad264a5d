"""This process's place in a torchrun job: rank, world, device, and the collectives the loop needs."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


class Dist:
    """Rank 0 of 1 without torchrun; under torchrun, a process group (nccl on GPUs, gloo on CPU)."""

    def __init__(self, device_kind: str, group: bool = False):
        """`group`: make the process group even with one process (FSDP2 needs one)."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}" if device_kind == "cuda" else "cpu")
        if device_kind == "cuda":
            torch.cuda.set_device(self.device)
        self.group = self.world > 1 or group
        if self.group and not dist.is_initialized():
            # generous timeout: the other ranks wait while rank 0 evaluates
            dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.group:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def all_gather_float(self, value: float) -> list[float]:
        """Every rank's `value`, in rank order."""
        values = torch.zeros(self.world, dtype=torch.float64)
        values[self.rank] = value
        return self.all_sum(values).tolist()

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def close(self) -> None:
        if self.group and dist.is_initialized():
            dist.destroy_process_group()
