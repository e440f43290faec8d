"""The cache build's own overhead: everything but the expert (decode, resample, encode, compress, commit).

Runs ``build_cache`` with a tiny expert (a 32-px, 2-block ViT: its forward costs next to nothing) at
the real student grid (24 x 24, N = 576) over synthetic 512-px JPEGs, so the images/s it reports is
the ceiling the pipeline puts on a GPU build whose expert is fast. Compare two versions of the code
on one machine by pointing PYTHONPATH at each checkout:

    python bench/cache_pipeline.py
    git worktree add /tmp/old COMMIT && PYTHONPATH=/tmp/old python bench/cache_pipeline.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.tiny import save_tiny_unimed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=256)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medalign-pipeline-"))
    try:
        rng = np.random.default_rng(0)
        (work / "images").mkdir()
        for i in range(args.count):
            arr = (rng.random((400, 512)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(work / "images" / f"img{i:04d}.jpg", quality=90)
        (work / "d.json").write_text(json.dumps([{"id": i, "image": f"img{i:04d}.jpg"} for i in range(args.count)]))
        (work / "cfg.json").write_text(json.dumps(save_tiny_unimed(work / "w.pt", "b")))
        best = float("inf")
        for _ in range(args.repeats):
            shutil.rmtree(work / "c", ignore_errors=True)
            cfg = BuildConfig(expert="unimed-b", weights=work / "w.pt", data=(work / "d.json",),
                              image_root=work / "images", grid=args.grid, out=work / "c", model_config=work / "cfg.json",
                              num_workers=args.num_workers, batch_size=args.batch_size, progress=False)
            t0 = time.perf_counter()
            build_cache(cfg)
            best = min(best, time.perf_counter() - t0)
        print(f"{args.count / best:.1f} images/s (best of {args.repeats}, end to end, tiny expert, grid {args.grid}, "
              f"{args.num_workers} decode worker(s), batch {args.batch_size})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
