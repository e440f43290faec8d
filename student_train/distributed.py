"""Distributed setup: torchrun's environment -> this process's rank, world size and device.

One process per device. Under ``torchrun --nproc-per-node K`` each rank takes its own GPU
(``cuda:LOCAL_RANK``) and joins the process group (nccl on GPU, gloo on CPU); a plain run is rank 0
of a world of 1 and never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shared.runtime import resolve_device


@dataclass
class Dist:
    """This process's place in the run; the collectives are no-ops in a world of one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        t = t.clone()
        if self.enabled:
            torch.distributed.all_reduce(t, op=op)
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a new tensor; ``t`` is left as it is)."""
        return self._reduce(t, torch.distributed.ReduceOp.SUM)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``t`` over the ranks (a new tensor)."""
        return self._reduce(t, torch.distributed.ReduceOp.MAX)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` averaged over the ranks (a new tensor)."""
        return self.sum(t) / self.world_size if self.enabled else t.clone()


def init_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment, pick the device, init the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_flag)
    if device.type == "cuda":
        if device_flag in ("auto", "cuda"):  # under torchrun each rank takes its own GPU
            device = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(device)
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def destroy_distributed(dist: Dist | None) -> None:
    """Leave the process group (when this run joined one)."""
    if dist is not None and dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
