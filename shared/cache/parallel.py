"""A cache build over the ranks of a torchrun job: who prepares, who writes which shard, who finishes.

Every rank plans the same rows (the plan is a pure function of the inputs; each rank checks its plan
equals the one on disk). Then, for any cache format whose writer has shards, markers and a finalize:

1. rank 0 takes the build lock and prepares ``--out`` (fresh, or ``--resume``: the shards with no
   marker are pending), and tells every rank the pending shards;
2. the other ranks attach to that build (no set-up of their own);
3. the pending shards are dealt round-robin (:func:`shared.distributed.round_robin`): each shard has
   exactly one writer, whatever the number of ranks, so a resumed build with another K is the same
   build; each rank computes its shards under a :class:`~shared.distributed.Heartbeat`;
4. when every rank has finished, rank 0 writes the index and, last, the manifest from the markers
   (which carry each shard's checksums and ``--skip-bad`` failures, whichever rank wrote it).

A failure anywhere fails every rank with that rank's error (:func:`shared.distributed.agree`); the
markers of the shards already committed stay, so ``--resume`` (with any K) finishes the build.

The lock: rank 0 holds ``--out``'s build lock for the whole job and the other ranks write only
after rank 0 holds it, so a second, unrelated builder is refused as in a one-process build.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from shared.cache.lock import build_lock
from shared.distributed import Dist, Heartbeat, run_step

W = TypeVar("W")
R = TypeVar("R")
C = TypeVar("C")


class ShardedBuild(Generic[W, R]):
    """The steps of one build, given as callables (MedAlign's and A3Tune's caches share them).

    * ``open_writer(attach)``: the format's writer; ``attach=False`` on rank 0 (prepare ``--out``),
      ``True`` on the others (join rank 0's build: check the plan, set nothing up);
    * ``pending(writer)``: the shards still to write, in order;
    * ``compute(writer, owned, pending)``: write the shards ``owned`` (this rank's share of
      ``pending``; a :class:`~shared.distributed.Heartbeat` inside sums the progress);
    * ``finalize(writer)``: rank 0, after every rank finished: index, manifest; returns the result;
    * ``reopen()``: the other ranks' result once rank 0 has finalized (e.g. ``Manifest.load``).
    """

    def __init__(self, out: str | Path, *, open_writer: Callable[[bool], W], pending: Callable[[W], list[int]],
                 compute: Callable[[W, list[int], list[int]], None], finalize: Callable[[W], R],
                 reopen: Callable[[], R]):
        self.out = Path(out)
        self.open_writer, self.pending, self.compute = open_writer, pending, compute
        self.finalize, self.reopen = finalize, reopen

    def run(self, dist: Dist) -> R:
        with contextlib.ExitStack() as stack:
            what = f"the build of {self.out}"

            def prepare():
                if not dist.is_main:
                    return None
                stack.enter_context(build_lock(self.out))
                return self.open_writer(False)

            writer = run_step(dist, what, prepare)
            pending = dist.broadcast_json(self.pending(writer) if dist.is_main else None)
            if pending and not dist.is_main:
                writer = run_step(dist, what, self.open_writer, True)
            elif pending:
                run_step(dist, what, lambda: None)
            if pending:
                self.compute(writer, shards_of_rank(pending, dist), pending)
            result = run_step(dist, what, lambda: self.finalize(writer) if dist.is_main else None)
        return result if dist.is_main else self.reopen()


def shards_of_rank(pending: list[int], dist: Dist) -> list[int]:
    """The pending shards rank ``dist.rank`` writes (round-robin: each shard exactly one writer)."""
    from shared.distributed import round_robin

    return round_robin(pending, dist)


def on_ranks(cfg: C, build: Callable[[C, Dist], R]) -> R:
    """``build(cfg, dist)`` as this process's rank: a plain run is a world of one (no process group);
    under torchrun (``WORLD_SIZE`` > 1) the rank joins a gloo group, takes ``cuda:LOCAL_RANK`` for
    ``--device cuda`` / ``auto``, and only rank 0 shows progress. ``cfg``: a dataclass with
    ``device`` and ``progress`` fields (either build's config)."""
    from shared.distributed import destroy_distributed, init_distributed, world_from_env

    dist = world_from_env()
    if not dist.enabled:
        return build(cfg, dist)
    dist, dev = init_distributed(cfg.device, backend="gloo")  # cuda -> cuda:LOCAL_RANK
    try:
        return build(dataclasses.replace(cfg, device=str(dev), progress=cfg.progress and dist.is_main), dist)
    finally:
        destroy_distributed(dist)


def shard_batches(writer, shards: list[int], batch_size: int) -> list[list[int]]:
    """Row batches of ``shards`` that never cross a shard boundary (``writer.shard_rows``): the same
    batches whether the build is resumed or not, and whichever rank computes a shard."""
    batches = []
    for s in shards:
        rows = list(writer.shard_rows(s))
        batches.extend(rows[i:i + batch_size] for i in range(0, len(rows), batch_size))
    return batches


@contextlib.contextmanager
def job_progress(dist: Dist, what: str, *, total: int, desc: str, enabled: bool) -> Iterator[Heartbeat]:
    """The :class:`~shared.distributed.Heartbeat` of a rank's shards, with one bar (``enabled`` on
    rank 0 only) counting the whole job's ``total`` rows."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc + (f" ({dist.world_size} ranks)" if dist.enabled else ""), unit="img",
               disable=not enabled, smoothing=0.1)

    def show(done: int) -> None:
        bar.update(done - bar.n)

    try:
        with Heartbeat(dist, what, on_beat=show if enabled else None) as beat:
            yield beat
    finally:
        bar.close()


__all__ = ["ShardedBuild", "job_progress", "on_ranks", "shard_batches", "shards_of_rank"]
