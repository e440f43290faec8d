"""shared.distributed on two real gloo processes: JSON collectives, error agreement, the heartbeat.

One spawn of two fresh interpreters (~5 s) runs every scenario in order; each rank writes what it
saw to a JSON file that the test reads. The splits are checked against a direct enumeration.
"""

from __future__ import annotations

import json
import os
import socket
import time

import torch.multiprocessing as mp

from shared.distributed import Dist, contiguous_slice, round_robin


def test_splits_cover_every_item_once():
    for n in range(0, 13):
        for parts in range(1, 6):
            pieces = [list(contiguous_slice(n, parts, i)) for i in range(parts)]
            assert [x for p in pieces for x in p] == list(range(n))
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
            owned = [round_robin(list(range(n)), Dist(r, parts)) for r in range(parts)]
            assert sorted(x for o in owned for x in o) == list(range(n))
            assert all(o == [x for x in range(n) if x % parts == r] for r, o in enumerate(owned))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MEDALIGN_DIST_TIMEOUT="30")
    import torch

    from shared.distributed import Heartbeat, RankFailed, agree, init_distributed, run_step

    torch.set_num_threads(1)
    dist, _ = init_distributed("cpu", backend="gloo")
    seen: dict = {"gather": dist.gather_json({"rank": rank, "text": "é" * rank}),
                  "bcast": dist.broadcast_json([1, "two"] if rank == 0 else None)}
    try:  # rank 1 fails a step: both ranks raise, rank 0 with rank 1's message
        run_step(dist, "step one", lambda: (_ for _ in ()).throw(ValueError("disk full")) if rank == 1 else 7)
    except Exception as e:
        seen["step"] = [type(e).__name__, str(e)]
    totals = []
    with Heartbeat(dist, "counting", on_beat=totals.append, interval=0.05) as beat:
        for _ in range(5 + 10 * rank):  # the ranks take different times
            beat.add(1)
            time.sleep(0.02)
    seen["beat_last"] = totals[-1]
    try:  # rank 0 fails inside a heartbeat while rank 1 keeps working: rank 1 stops at its next check
        with Heartbeat(dist, "work", interval=0.05) as beat:
            for i in range(400):
                beat.check()
                if rank == 0 and i == 3:
                    raise RuntimeError("bad batch")
                time.sleep(0.01)
        seen["aborted"] = None
    except Exception as e:
        seen["aborted"] = [type(e).__name__, str(e), isinstance(e, RankFailed)]
    agree(dist, None, "the end")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["gather"] == r1["gather"] == [{"rank": 0, "text": ""}, {"rank": 1, "text": "é"}]
    assert r0["bcast"] == r1["bcast"] == [1, "two"]
    assert r1["step"] == ["ValueError", "disk full"]
    assert r0["step"][0] == "RankFailed" and "rank 1 failed during step one: ValueError: disk full" in r0["step"][1]
    assert r0["beat_last"] == r1["beat_last"] == 5 + 15  # the job-wide count, on both ranks
    assert r0["aborted"][:2] == ["RuntimeError", "bad batch"]
    assert r1["aborted"][2] and "rank 0 failed during work: RuntimeError: bad batch" in r1["aborted"][1]
