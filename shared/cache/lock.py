"""One builder per cache directory: an exclusive lock file held for the whole build.

Two builders on one ``--out`` would race on the staging area and the shards (zarr's sharding codec
is not safe for concurrent writers of a shard). ``CACHE/.build.lock`` is created with ``O_EXCL`` and
holds the holder's host, pid and start time; a second builder fails at once naming them. A lock
whose holder is gone (same host, the pid no longer running) is taken over. The lock is removed when
the build ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from shared.errors import MedAlignError

LOCK_NAME = ".build.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _try_create(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
        f.flush()
        os.fsync(f.fileno())
    return True


@contextlib.contextmanager
def build_lock(out: str | Path) -> Iterator[Path]:
    """Hold ``out/.build.lock`` for the duration of the ``with`` block (creating ``out`` if needed;
    a directory created here and left empty is removed again)."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not _try_create(path, me):
        try:
            holder = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            holder = {}
        stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])
        taken_over = False
        if stale:  # its holder died (e.g. kill -9): take it over, unless another builder just did
            path.unlink(missing_ok=True)
            taken_over = _try_create(path, me)
        if not taken_over:
            raise MedAlignError(
                f"--out {out} is being built by another process (host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}, since {holder.get('started', '?')}); wait for it, or remove "
                f"{path} if that process is gone")
    try:
        yield path
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


__all__ = ["LOCK_NAME", "build_lock"]
