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
                geometry: str = "pad", resample_order: str = DEFAULT_RESAMPLE_ORDER,
                chunk_checksums: bool = True) -> Path:
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
                         sim_dtype=dtype, shard_size=shard_size, chunk_checksums=chunk_checksums)
    for s in writer.pending_shards():
        r = writer.shard_rows(s)
        writer.write_shard(s, np.asarray(sims[r.start:r.stop], np.float32), attns[r.start:r.stop])
    writer.finalize(expert=expert, arch="synthetic", weights_sha256="0" * 64, token_mode="raw",
                    preprocessing={"image_size": 0, "mean": [0, 0, 0], "std": [1, 1, 1], "geometry": geometry,
                                   "interpolation": "bicubic"},
                    layer="last block", patch_grid=patch_grid or grid, grid=grid, resample_order=resample_order)
    return Path(out)


#: Manifest keys added after the first release of format 1 (a manifest without them is an older one).
LATER_MANIFEST_KEYS = ("index_sha256", "checksum")


def make_legacy_manifest(cache_dir: str | Path, *drop: str) -> dict:
    """Rewrite ``cache_dir``'s manifest as a tool without ``drop`` (and without the later keys) wrote it."""
    import json

    path = Path(cache_dir) / "manifest.json"
    data = json.loads(path.read_text())
    for key in (*drop, *LATER_MANIFEST_KEYS):
        data.pop(key, None)
    path.write_text(json.dumps(data))
    return data


def chunk_span(cache: str | Path, storage: str, array: str, row: int, shard_size: int,
               shard_rows: int | None = None) -> tuple[Path, int, int]:
    """(file, byte offset, length) of one row's stored chunk of ``array``, found with the formats' own
    tools (the zarr shard index, h5py's chunk info), for tests that damage a chunk. ``shard_rows``:
    the rows of that zarr shard's index (its chunk grid; default ``shard_size``)."""
    cache = Path(cache)
    shard, offset = divmod(row, shard_size)
    if storage == "zarr":
        path = cache / array / "c" / str(shard) / "0"
        raw = path.read_bytes()
        rows = shard_rows or shard_size
        index = np.frombuffer(raw[-(16 * rows + 4):-4], dtype="<u8").reshape(rows, 2)
        return path, int(index[offset, 0]), int(index[offset, 1])
    import h5py

    path = cache / "shards" / f"shard-{shard:05d}.h5"
    with h5py.File(path, "r") as f:
        info = f[array].id.get_chunk_info(offset)
    return path, int(info.byte_offset), int(info.size)


def flip_bytes(path: str | Path, at: int, count: int = 2) -> None:
    """XOR ``count`` bytes of a file from offset ``at`` (a damaged disk block, in miniature)."""
    path = Path(path)
    raw = bytearray(path.read_bytes())
    for i in range(count):
        raw[at + i] ^= 0x5A
    path.write_bytes(bytes(raw))
