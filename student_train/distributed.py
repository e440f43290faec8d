"""Distributed setup of training: torchrun's environment -> this process's rank, world size and device.

The machinery lives in :mod:`shared.distributed` (the cache build and generation use it too); training
joins with nccl on GPU and gloo on CPU. A plain run is rank 0 of a world of 1 and never touches
``torch.distributed``.
"""

from __future__ import annotations

from shared.distributed import Dist, destroy_distributed, init_distributed

__all__ = ["Dist", "init_distributed", "destroy_distributed"]
