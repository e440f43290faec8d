"""What training tells the user: console lines, ``train_log.jsonl`` (one record per optimizer step),
TensorBoard scalars under ``tb/`` and the progress bar. Only rank 0 writes.

A record holds the step, epoch, the loss terms, the learning rate(s), ``grad_norm`` (the total norm
of the trainable gradients before clipping), ``samples_per_s``, ``peak_mem_mib`` (the largest
:func:`peak_memory_mib` over the ranks) and the sample counts; every number but step, epoch and
samples is also a TensorBoard scalar.

On resume the log lines past the checkpoint (steps that will be redone) are dropped and TensorBoard
purges the same steps, so a resumed run's log reads like an uninterrupted one.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

#: The loss terms of a MedAlign record (:func:`student_train.model.compute_losses`); other methods
#: name theirs (``TrainingMethod.log_names``).
LOG_NAMES = ("loss", "lm_loss", "vis_loss", "att_loss")
#: Record keys that are not TensorBoard scalars.
NOT_SCALARS = ("step", "epoch", "samples")


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        from tqdm import tqdm
        tqdm.write(msg)


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far in MiB: CUDA memory allocated on ``device``, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class StepLog:
    """``train_log.jsonl`` + TensorBoard + progress bar of one run, continuing at ``step``."""

    def __init__(self, out: Path, *, step: int, total_steps: int, log_every: int,
                 names: tuple[str, ...] = LOG_NAMES):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.path = out / "train_log.jsonl"
        self.total_steps, self.log_every, self.names = total_steps, log_every, tuple(names)
        self.writer = SummaryWriter(str(out / "tb"), purge_step=step + 1)
        self._truncate(step)
        self.pbar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)

    def _truncate(self, step: int) -> None:
        """Drop log lines past the checkpoint being resumed (steps that will be redone)."""
        if self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        step = record["step"]
        for k, v in record.items():
            if k not in NOT_SCALARS:
                self.writer.add_scalar(k, v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.pbar.update(1)
        self.pbar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if step % self.log_every == 0:
            terms = " ".join(f"{k} {record[k]:.4f}" for k in self.names)
            log(f"step {step}/{self.total_steps} epoch {record['epoch']} {terms} lr {record['lr']:.3e} "
                f"grad_norm {record['grad_norm']:.4f} {record['samples_per_s']:.2f} samples/s "
                f"peak {record['peak_mem_mib']:.0f} MiB")

    def close(self) -> None:
        self.pbar.close()
        self.writer.close()
