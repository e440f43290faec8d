"""Reading a cache: one lazy, fork-safe reader for both storage formats.

``open_cache(path)`` reads only ``manifest.json``. The arrays, the path index and the key index
are opened on first use *in the process that uses them* (a DataLoader worker reopens after a
fork), and a read touches only the row asked for, so memory does not grow with the cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from shared.cache.encoding import decode_sim
from shared.cache.manifest import INDEX_NAME, MANIFEST_NAME, Manifest
from shared.cache.storage import make_storage
from shared.cache.writer import normalise_rel
from shared.errors import MedAlignError
from shared.grid import unpack_triangle
from shared.images import sha256_file


class CacheReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
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
        return self._store().keys()

    def key_of(self, row: int) -> str:
        """sha256 of one row's image (a single small read; "" for a row whose image failed)."""
        if not 0 <= row < self.manifest.rows:
            raise IndexError(f"row {row} out of range for a cache of {self.manifest.rows} rows")
        return self._store().key_of(row)

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
        tri, attn = self._store().read(int(row))
        return unpack_triangle(decode_sim(tri, self.manifest.sim_dtype)), np.asarray(attn, dtype=np.float32)

    def get(self, rel_path: str, image_root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        row = self.lookup(rel_path, image_root)
        return None if row is None else self.read(row)

    def identity(self) -> dict:
        """Who taught a run, saved with every training run (JSON-able): :meth:`Manifest.identity`
        (what makes caches interchangeable) plus this copy's storage format, path, manifest digest and rows."""
        digest = sha256_file(self.path / MANIFEST_NAME)
        return {**self.manifest.identity(), "format": self.manifest.storage, "path": str(self.path.resolve()),
                "manifest_sha256": digest, "rows": self.manifest.rows}


def open_cache(path: str | Path) -> CacheReader:
    if not Path(path).is_dir():
        raise MedAlignError(f"cache not found: {path}")
    return CacheReader(path)
