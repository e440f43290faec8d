"""Reading a cache: one lazy, fork-safe reader for both storage formats.

``open_cache(path)`` reads only ``manifest.json``. The arrays, the path index and the key index
are opened on first use *in the process that uses them* (a DataLoader worker reopens after a
fork), and a read touches only the row asked for, so memory does not grow with the cache.

Every read is checked (docs/design.md 2, "Faults"): the chunk's checksum (by the storage layer), then
the values, at a cost of two reductions per array: every ``S_e`` entry within
[-1 - 1e-3, 1 + 1e-3] with a unit diagonal (cosines of normalised features; a zero-filled row
fails), every ``E_a`` entry finite and >= 0. Anything wrong, including a missing or truncated shard
file, raises one :class:`~shared.errors.CacheDamagedError` naming the cache, shard, row and image.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from shared.cache.encoding import decode_sim
from shared.cache.manifest import INDEX_NAME, MANIFEST_NAME, Manifest
from shared.cache.storage import make_storage
from shared.cache.writer import normalise_rel
from shared.errors import CacheDamagedError, MedAlignError
from shared.grid import triangle_size, unpack_triangle
from shared.images import sha256_file


#: |S_e| may exceed 1 by float16 rounding of a cosine (and fp error), never by more.
SIM_BOUND = 1.0 + 1e-3
#: S_e's diagonal is |f|^2 = 1 for normalised features, up to the int8 / float16 encoding.
DIAGONAL_TOLERANCE = 2e-2
#: What a damaged store raises from h5py, zarr, blosc or the direct shard reader.
_STORE_ERRORS = (OSError, ValueError, KeyError, RuntimeError, IndexError, TypeError, EOFError)


@lru_cache(maxsize=4)
def _diagonal(n: int) -> np.ndarray:
    """Positions of the diagonal in the packed triangle (``np.triu_indices(n)`` order)."""
    i = np.arange(n)
    return i * n - i * (i - 1) // 2


class CacheReader:
    """One cache. ``check_values=False`` skips the value checks on read (the benchmark's baseline only)."""

    def __init__(self, path: str | Path, *, check_values: bool = True):
        self.path = Path(path)
        self.check_values = check_values
        self.manifest = Manifest.load(self.path)
        self._rows = None
        self._index: dict[str, int] | None = None
        self._key_rows: dict[str, int] | None = None
        self._pid: int | None = None

    # Worker processes get a fresh copy without open handles.
    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_rows=None, _pid=None)
        return state

    def _store(self):
        if self._rows is None or self._pid != os.getpid():
            m = self.manifest
            self._rows = make_storage(m.storage, self.path, m.rows, m.num_tokens, m.shard_size,
                                      m.sim_dtype).open_reader()
            self._pid = os.getpid()
        return self._rows

    def __len__(self) -> int:
        return self.manifest.rows

    def close(self) -> None:
        """Close open files (reopened on the next read). Call before forking if you read in the parent."""
        rows, self._rows, self._pid = self._rows, None, None
        if rows is not None and hasattr(rows, "close"):
            rows.close()

    @property
    def index(self) -> dict[str, int]:
        """Dataset-relative image path -> row."""
        if self._index is None:
            self._index = json.loads((self.path / INDEX_NAME).read_text())
        return self._index

    def keys(self) -> list[str]:
        """sha256 of each row's image, in row order ("" for rows whose image failed)."""
        try:
            keys = self._store().keys()
        except _STORE_ERRORS as e:
            raise CacheDamagedError(f"teacher cache {self.path}: the key array cannot be read ({_reason(e)}); "
                                    f"run `medalign-cache verify {self.path}`") from None
        if len(keys) != self.manifest.rows:
            raise CacheDamagedError(f"teacher cache {self.path}: the key array holds {len(keys)} rows, the manifest "
                                    f"{self.manifest.rows}; run `medalign-cache verify {self.path}`")
        return keys

    def key_of(self, row: int) -> str:
        """sha256 of one row's image (a single small read; "" for a row whose image failed)."""
        if not 0 <= row < self.manifest.rows:
            raise IndexError(f"row {row} out of range for a cache of {self.manifest.rows} rows")
        try:
            return self._store().key_of(row)
        except _STORE_ERRORS as e:
            raise self._damaged(row, f"cannot be read ({_reason(e)})") from None

    def image_of(self, row: int) -> str:
        """A dataset-relative path of the row's image, for messages ("?" when none can be named)."""
        try:
            return next((p for p, r in self.index.items() if r == row), "? (not in index.json)")
        except (OSError, ValueError, AttributeError):
            return "? (index.json unreadable)"

    def _damaged(self, row: int, what: str) -> CacheDamagedError:
        shard = row // max(self.manifest.shard_size, 1)
        return CacheDamagedError(f"teacher cache {self.path}: row {row} (shard {shard}, image {self.image_of(row)}) "
                                 f"{what}; run `medalign-cache verify {self.path}`")

    def row_of_key(self, key: str) -> int | None:
        if self._key_rows is None:
            self._key_rows = {k: r for r, k in enumerate(self.keys()) if k}
        return self._key_rows.get(key)

    def lookup(self, rel_path: str, image_root: str | Path | None = None) -> int | None:
        """Row for a dataset-relative path; falls back to hashing ``image_root/rel_path`` so renamed
        folders still hit. None when the image is not in the cache."""
        row = self.index.get(normalise_rel(rel_path))
        if row is not None:
            return row
        if image_root is not None:
            path = Path(image_root) / rel_path
            if path.is_file():
                return self.row_of_key(sha256_file(path))
        return None

    def read(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(S_e float32 [N, N], E_a float32 [N]) for one row."""
        if not 0 <= row < self.manifest.rows:
            raise IndexError(f"row {row} out of range for a cache of {self.manifest.rows} rows")
        row = int(row)
        try:
            tri, attn = self._store().read(row)
            if tri.shape != (triangle_size(self.manifest.num_tokens),) or np.shape(attn) != (self.manifest.num_tokens,):
                raise ValueError(f"stored shapes {tri.shape} / {np.shape(attn)} do not match the manifest's grid")
        except _STORE_ERRORS as e:
            raise self._damaged(row, f"cannot be read ({_reason(e)})") from None
        sim = decode_sim(tri, self.manifest.sim_dtype)
        attn = np.asarray(attn, dtype=np.float32)
        if self.check_values:
            self._check_values(row, sim, attn)
        return unpack_triangle(sim), attn

    def _check_values(self, row: int, tri: np.ndarray, attn: np.ndarray) -> None:
        lo, hi = float(tri.min()), float(tri.max())  # a NaN propagates and fails both comparisons
        if not (lo >= -SIM_BOUND and hi <= SIM_BOUND):
            raise self._damaged(row, f"holds similarity values no cosine has (min {lo:.4g}, max {hi:.4g})")
        diag = tri[_diagonal(self.manifest.num_tokens)]
        if not float(np.abs(diag - 1.0).max()) <= DIAGONAL_TOLERANCE:
            raise self._damaged(row, f"has a similarity diagonal of {float(diag.min()):.4g}..{float(diag.max()):.4g}, "
                                "not 1 (a zero-filled or foreign row)")
        lo, hi = float(attn.min()), float(attn.max())
        if not (lo >= 0.0 and hi < np.inf):
            raise self._damaged(row, f"holds attention values that are negative or not finite (min {lo:.4g}, "
                                f"max {hi:.4g})")

    def get(self, rel_path: str, image_root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        row = self.lookup(rel_path, image_root)
        return None if row is None else self.read(row)

    def identity(self) -> dict:
        """Who taught a run, saved with every training run (JSON-able): :meth:`Manifest.identity`
        (what makes caches interchangeable) plus this copy's storage format, path, manifest digest and rows."""
        digest = sha256_file(self.path / MANIFEST_NAME)
        return {**self.manifest.identity(), "format": self.manifest.storage, "path": str(self.path.resolve()),
                "manifest_sha256": digest, "rows": self.manifest.rows}


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def open_cache(path: str | Path, *, check_values: bool = True) -> CacheReader:
    if not Path(path).is_dir():
        raise MedAlignError(f"cache not found: {path}")
    return CacheReader(path, check_values=check_values)
