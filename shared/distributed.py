"""torchrun's environment for every stage: ranks, the process group, and how work is split and joined.

One process per device. Under ``torchrun --nproc-per-node K`` a rank reads ``RANK`` / ``WORLD_SIZE``
/ ``LOCAL_RANK`` and takes ``cuda:LOCAL_RANK``; a plain run is rank 0 of a world of one and never
touches ``torch.distributed``. Training (DDP) joins with nccl on GPU; the cache build and generation
exchange only small control messages, so they join with gloo on every device (CPU tensors).

Every collective has a timeout (``init_process_group(timeout=...)``, ``MEDALIGN_DIST_TIMEOUT``
seconds, default 1800), so a rank that dies makes the others fail instead of hanging. The pieces
the parallel stages share:

* :func:`contiguous_slice` / :func:`round_robin`: which items a rank owns (every item exactly once);
* :meth:`Dist.gather_json` / :meth:`Dist.broadcast_json`: JSON over the group (no pickle);
* :func:`agree`: every rank learns whether any rank failed a step, and each raises that rank's error;
* :class:`Heartbeat`: while the ranks work at their own pace, a background thread all-reduces their
  progress every few seconds (one job-wide count for rank 0's bar), notices a failed or vanished rank
  within one beat, and ends when every rank has finished; no barrier waits on a slow rank's work.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from shared.errors import MedAlignError
from shared.runtime import resolve_device

TIMEOUT_ENV = "MEDALIGN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
#: Test hook: ``RANK:POINT`` makes that rank SIGKILL itself at ``maybe_die(POINT)`` (after its first shard...).
KILL_ENV = "MEDALIGN_TEST_KILL"


@dataclass
class Dist:
    """This process's place in the run; the collectives are no-ops in a world of one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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

    def gather_json(self, obj) -> list:
        """Every rank's ``obj`` (JSON-serialisable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64))
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:data.numel()] = data
        bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        torch.distributed.all_gather(bufs, padded)
        return [json.loads(bytes(b[:int(s)].tolist()).decode()) for b, s in zip(bufs, sizes)]

    def broadcast_json(self, obj=None, src: int = 0):
        """``obj`` of rank ``src`` on every rank (the others pass anything)."""
        if not self.enabled:
            return obj
        return self.gather_json(obj if self.rank == src else None)[src]


def world_from_env() -> Dist:
    """This process's rank, world size and local rank from torchrun's environment (no set-up)."""
    return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))


def dist_timeout() -> datetime.timedelta:
    """The timeout of every collective: ``MEDALIGN_DIST_TIMEOUT`` seconds, default 1800."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise MedAlignError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    return datetime.timedelta(seconds=seconds)


def init_distributed(device_flag: str, backend: str | None = None) -> tuple[Dist, torch.device]:
    """Read torchrun's environment, pick the device (``cuda:LOCAL_RANK`` for auto/cuda), join the
    process group when WORLD_SIZE > 1: ``backend``, default nccl on CUDA and gloo on CPU."""
    dist = world_from_env()
    device = resolve_device(device_flag)
    if device.type == "cuda":
        if device_flag in ("auto", "cuda"):  # under torchrun each rank takes its own GPU
            device = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(device)
    if dist.enabled and not torch.distributed.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        torch.distributed.init_process_group(backend, timeout=dist_timeout())
    return dist, device


def destroy_distributed(dist: Dist | None) -> None:
    """Leave the process group (when this run joined one)."""
    if dist is not None and dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def contiguous_slice(n: int, parts: int, index: int) -> range:
    """Part ``index`` of ``range(n)`` cut into ``parts`` contiguous pieces whose sizes differ by at most one."""
    if not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts}")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def round_robin(items: Sequence, dist: Dist) -> list:
    """The items rank ``dist.rank`` owns: every ``world_size``-th, starting at its rank (each item
    owned by exactly one rank; consecutive items, e.g. shards, go to different ranks, which keeps
    the ranks busy to the end)."""
    return list(items[dist.rank::dist.world_size])


def maybe_die(point: str, dist: Dist) -> None:
    """Test hook: SIGKILL this process when ``MEDALIGN_TEST_KILL`` is ``<this rank>:<point>``."""
    if os.environ.get(KILL_ENV) == f"{dist.rank}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


class RankFailed(MedAlignError):
    """Another rank of this job failed (its error is the message), or a rank vanished."""


def _lost(dist: Dist, what: str, err: BaseException) -> RankFailed:
    return RankFailed(f"rank {dist.rank}: lost contact with the other ranks during {what} (a rank died, or "
                      f"did not answer within {TIMEOUT_ENV}={dist_timeout().total_seconds():g}s): "
                      f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, MedAlignError) else f"{type(err).__name__}: {err}"


def agree(dist: Dist, error: BaseException | None, what: str) -> None:
    """End a step on every rank together: gather each rank's error (None when it succeeded); when
    any rank failed, every rank raises -- the failed rank its own exception, the others (including
    ranks that stopped because of it) a :class:`RankFailed` quoting the first failed rank's error."""
    if not dist.enabled:
        if error is not None:
            raise error
        return
    try:
        reports = dist.gather_json(None if error is None else
                                   {"error": _describe(error), "aborted": isinstance(error, RankFailed)})
    except Exception as e:  # a rank died before this step ended
        raise _lost(dist, what, e) from error
    if error is not None and not isinstance(error, RankFailed):
        raise error
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if failed:
        r, rep = next(((r, rep) for r, rep in failed if not rep["aborted"]), failed[0])
        if r == dist.rank and error is not None:
            raise error
        raise RankFailed(f"rank {r} failed during {what}: {rep['error']}") from error


def run_step(dist: Dist, what: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on this rank, then :func:`agree`; returns fn's result."""
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:
        error = e
    agree(dist, error, what)
    return result


class Heartbeat:
    """The ranks' progress, summed every ``interval`` seconds by a background thread.

    ``add(n)`` counts this rank's work; ``check()`` (between units of work) raises
    :class:`RankFailed` once another rank has failed or the group is lost; the ``with`` block's end
    waits until every rank has finished (however long the slowest takes: every beat is a short
    collective, so the timeout bounds silence, not imbalance), then :func:`agree`\\ s on the errors.
    ``on_beat(total)`` (the job-wide count) is called on every beat, on every rank; in a world of
    one, on every ``add``.
    """

    def __init__(self, dist: Dist, what: str, on_beat: Callable[[int], None] | None = None,
                 interval: float = 2.0):
        self.dist, self.what, self.on_beat, self.interval = dist, what, on_beat, interval
        self.count = 0
        self.total = 0
        self._finished = 0
        self._failed = 0
        self.others_failed = False
        self.lost: BaseException | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        if self.dist.enabled:
            self._thread = threading.Thread(target=self._loop, name="medalign-heartbeat", daemon=True)
            self._thread.start()
        return self

    def add(self, n: int) -> None:
        self.count += n
        if not self.dist.enabled:
            self.total = self.count
            if self.on_beat is not None:
                self.on_beat(self.total)

    def check(self) -> None:
        if self.lost is not None:
            raise _lost(self.dist, self.what, self.lost)
        if self.others_failed:
            raise RankFailed(f"rank {self.dist.rank}: stopping, another rank failed during {self.what}")

    def _loop(self) -> None:
        while True:
            t = torch.tensor([self.count, self._finished, self._failed], dtype=torch.int64)
            try:
                torch.distributed.all_reduce(t)
            except Exception as e:  # a peer vanished (connection closed) or timed out
                self.lost = e
                return
            self.total = int(t[0])
            if int(t[2]) > self._failed:
                self.others_failed = True
            if self.on_beat is not None:
                self.on_beat(self.total)
            if int(t[1]) == self.dist.world_size:
                return
            self._wake.wait(self.interval)
            self._wake.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._thread is not None:
            if exc is not None:
                self._failed = 1
            self._finished = 1
            self._wake.set()
            self._thread.join()
            if self.lost is not None:
                lost = _lost(self.dist, self.what, self.lost)
                if exc is not None:
                    return False
                raise lost
        agree(self.dist, exc if isinstance(exc, Exception) else None, self.what)
        return False


__all__ = ["Dist", "world_from_env", "dist_timeout", "init_distributed", "destroy_distributed",
           "contiguous_slice", "round_robin", "maybe_die", "RankFailed", "agree", "run_step", "Heartbeat",
           "TIMEOUT_ENV", "KILL_ENV"]
