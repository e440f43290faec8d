"""Test helper: a finished teacher cache written straight from arrays (no expert, no images).

Used by the tests of every stage and by ``bench/cache.py``; it drives the real
:class:`~shared.cache.CacheWriter`, so what it writes is what ``medalign-cache build`` writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.cache import CacheWriter
from shared.cache.writer import DEFAULT_SHARD_SIZE
from shared.grid import DEFAULT_RESAMPLE_ORDER


def write_cache(out: str | Path, sims: np.ndarray, attns: np.ndarray, keys: list[str], index: dict[str, int], *,
                expert: str = "test", format: str = "zarr", dtype: str = "float16",
                shard_size: int = DEFAULT_SHARD_SIZE, patch_grid: int | None = None,
                geometry: str = "pad", resample_order: str = DEFAULT_RESAMPLE_ORDER) -> Path:
    """Write a cache straight from arrays: ``sims`` (R, N, N), ``attns`` (R, N). For tests and tools.

    ``sims`` only needs ``.shape`` and row slicing, so a lazy or memory-mapped array works.
    """
    attns = np.asarray(attns, np.float32)
    rows, n = attns.shape
    grid = int(round(n ** 0.5))
    if grid * grid != n or tuple(sims.shape) != (rows, n, n) or len(keys) != rows:
        raise ValueError(f"inconsistent shapes: sims {sims.shape}, attns {attns.shape}, {len(keys)} keys")
    identity = {"expert": expert, "weights_sha256": "0" * 64, "grid": grid, "geometry": geometry, "token_mode": "raw",
                "resample_order": resample_order}
    writer = CacheWriter(out, identity=identity, keys=keys, index=index, num_tokens=n, storage=format,
                         sim_dtype=dtype, shard_size=shard_size)
    for s in writer.pending_shards():
        r = writer.shard_rows(s)
        writer.write_shard(s, np.asarray(sims[r.start:r.stop], np.float32), attns[r.start:r.stop])
    writer.finalize(expert=expert, arch="synthetic", weights_sha256="0" * 64, token_mode="raw",
                    preprocessing={"image_size": 0, "mean": [0, 0, 0], "std": [1, 1, 1], "geometry": geometry,
                                   "interpolation": "bicubic"},
                    layer="last block", patch_grid=patch_grid or grid, grid=grid, resample_order=resample_order)
    return Path(out)
