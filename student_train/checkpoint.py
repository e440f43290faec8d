"""Checkpoints: atomic ``checkpoints/step-N`` directories, keeping the latest N, resuming from one,
and moving the final adapter + W into ``RUN_DIR``.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed when complete; ``state.json``
is written last, so a directory without it (a run killed mid-write) is never resumed from. It holds
the adapter + W in their standard format, every trainable tensor (``trainable.safetensors``), the
optimizer (``optimizer.pt``), the scheduler (``scheduler.json``), the position in the data
(``state.json``) and each rank's RNG states (``rng-rankRRRRR.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from shared.errors import MedAlignError
from shared.fileio import atomic_write_json
from student_train.distributed import Dist
from student_train.rng import rng_state, set_rng_state

CHECKPOINTS = "checkpoints"


def _complete(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def find_checkpoint(run_dir: Path) -> Path | None:
    """The latest complete checkpoint in ``run_dir`` (temporary, half-written ones are ignored)."""
    root = run_dir / CHECKPOINTS
    done = _complete(root) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(out: Path, dist: Dist, *, model, trainable, optimizer, scheduler, state: dict,
                    keep: int) -> Path:
    """Write ``out/checkpoints/step-N`` (N = ``state["global_step"]``) atomically on all ranks, then
    drop all but the ``keep`` latest complete ones."""
    from safetensors.torch import save_file

    from student_train.model import save_trained

    name = f"step-{state['global_step']:08d}"
    root = out / CHECKPOINTS
    tmp = root / f".tmp-{name}"
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    atomic_write_json(tmp / f"rng-rank{dist.rank:05d}.json", rng_state())
    if dist.rank == 0:
        save_trained(model, tmp)
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "scheduler.json", scheduler.state_dict())
    dist.barrier()
    if dist.rank == 0:
        atomic_write_json(tmp / "state.json", state)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / name


def load_checkpoint(ckpt: Path, dist: Dist, *, trainable, optimizer, scheduler, device: torch.device,
                    total_steps: int) -> dict:
    """Restore the weights, optimizer, scheduler and this rank's RNG from ``ckpt``; returns its
    ``state.json``. Refuses a checkpoint of another world size or schedule length."""
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    if state["world_size"] != dist.world_size:
        raise MedAlignError(f"{ckpt} was written by {state['world_size']} process(es); resume it with the "
                            f"same number (now {dist.world_size})")
    if state["total_steps"] != total_steps:
        raise MedAlignError(f"{ckpt} belongs to a run of {state['total_steps']} steps, this one has "
                            f"{total_steps}; the data or schedule changed")
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(trainable)
    if set(tensors) != set(params):
        raise MedAlignError(f"{ckpt} holds different trainable weights than this model")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
    set_rng_state(json.loads((ckpt / f"rng-rank{dist.rank:05d}.json").read_text()))
    return state


def save_final(out: Path, model) -> None:
    """Adapter + W into ``out`` (written into a temporary directory, then moved in file by file)."""
    from student_train.model import save_trained

    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_trained(model, tmp)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()
