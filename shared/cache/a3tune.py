"""Reading an A3Tune cache: per question, the top-k SAM masks on the student's grid as 0/1 labels.

``open_a3_cache(path)`` reads only ``manifest.json``; arrays are opened on first use in the
process that reads (picklable: a DataLoader worker reopens after a fork), and a read touches one
question row and one image row. ``entry(key)`` is None for a question not in the cache, and has
``k = 0`` labels for a question whose image kept no mask (the authors' "no crop, no labels").

Every read is checked: chunk checksums by the storage layer, then the values: the question's image
row exists and holds an image, ``0 <= count <= max_masks``, the selected indices are distinct,
below ``count``, a -1-padded prefix of at most ``top_k``, the scores finite cosines; padding slots
of the masks are zero. Anything wrong raises one :class:`~shared.errors.CacheDamagedError` naming
the cache, the question and the image row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.cache.a3_manifest import A3Manifest, read_signals
from shared.cache.a3_storage import make_a3_storage
from shared.cache.manifest import INDEX_NAME, MANIFEST_NAME
from shared.cache.reader import _reason  # one wording of a read error for both cache kinds
from shared.errors import CacheDamagedError, MedAlignError
from shared.images import sha256_file

#: a stored cosine may exceed 1 by float error, never by more
SCORE_BOUND = 1.0 + 1e-3
_STORE_ERRORS = (OSError, ValueError, KeyError, RuntimeError, IndexError, TypeError, EOFError)


@dataclass
class A3Entry:
    """One question's labels: ``labels`` [k, N] float32 0/1 on the G x G grid (row-major), ``scores`` [k]."""

    image_key: str
    query_sha256: str
    labels: np.ndarray
    scores: np.ndarray


def is_a3_cache(path: str | Path) -> bool:
    """Whether ``path`` holds a manifest saying ``signals == "a3tune"``."""
    return read_signals(path) == "a3tune"


class A3Cache:
    """One A3 cache (module docstring). ``check_values=False`` skips the value checks."""

    def __init__(self, path: str | Path, *, check_values: bool = True):
        self.path = Path(path)
        self.check_values = check_values
        self.manifest = A3Manifest.load(self.path)
        self.grid = self.manifest.grid
        self.num_tokens = self.manifest.num_tokens
        self._rows = self._sel = None
        self._pid: int | None = None
        self._qrows: dict[str, int] | None = None
        self._index: dict[str, int] | None = None
        self._keys: list[str] | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_rows=None, _sel=None, _pid=None)
        return state

    def _open(self):
        if self._rows is None or self._pid != os.getpid():
            m = self.manifest
            store = make_a3_storage(m.storage, self.path, m.rows, m.shard_size, m.max_masks, m.mask_bytes, m.embed_dim)
            try:
                self._rows = store.open_rows()
                self._sel = store.open_selection(m.selection["name"])
            except _STORE_ERRORS as e:
                raise CacheDamagedError(f"A3 cache {self.path}: its arrays cannot be opened ({_reason(e)}); run "
                                        f"`medalign-cache verify {self.path}`") from None
            self._pid = os.getpid()
        return self._rows, self._sel

    def close(self) -> None:
        rows, sel = self._rows, self._sel
        self._rows = self._sel = self._pid = None
        if rows is not None:
            rows.close()
        if sel is not None and "_file" in sel:
            sel["_file"].close()

    def _damaged(self, what: str) -> CacheDamagedError:
        return CacheDamagedError(f"A3 cache {self.path}: {what}; run `medalign-cache verify {self.path}`")

    # -- images -------------------------------------------------------------------------------------
    @property
    def index(self) -> dict[str, int]:
        """Dataset-relative image path -> image row."""
        if self._index is None:
            self._index = json.loads((self.path / INDEX_NAME).read_text())
        return self._index

    def keys(self) -> list[str]:
        """sha256 of each image row ("" for a failed row)."""
        if self._keys is None:
            try:
                keys = self._open()[0].keys()
            except _STORE_ERRORS as e:
                raise self._damaged(f"the key array cannot be read ({_reason(e)})") from None
            if len(keys) != self.manifest.rows:
                raise self._damaged(f"the key array holds {len(keys)} rows, the manifest {self.manifest.rows}")
            self._keys = keys
        return self._keys

    def read_image(self, row: int, with_emb: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(masks bool [count, N], crop features float32 [count, D] or None) of one image row, checked."""
        m = self.manifest
        if not 0 <= row < m.rows:
            raise IndexError(f"image row {row} out of range for {m.rows} rows")
        try:
            count, packed, emb = self._open()[0].read(int(row), with_emb)
            packed = np.asarray(packed, np.uint8)
            if packed.shape != (m.max_masks * m.mask_bytes,):
                raise ValueError(f"stored mask row of {packed.shape} bytes, the manifest implies "
                                 f"{m.max_masks * m.mask_bytes}")
        except _STORE_ERRORS as e:
            raise self._damaged(f"image row {row} cannot be read ({_reason(e)})") from None
        packed = packed.reshape(m.max_masks, m.mask_bytes)
        if self.check_values and not 0 <= count <= m.max_masks:
            raise self._damaged(f"image row {row} claims {count} masks (0..{m.max_masks} possible)")
        if self.check_values and packed[count:].any():
            raise self._damaged(f"image row {row} has mask bits past its {count} masks (a foreign or shifted row)")
        masks = np.unpackbits(packed[:count], axis=1, count=m.num_tokens).astype(bool)
        if emb is not None:
            emb = np.asarray(emb, np.float32).reshape(m.max_masks, m.embed_dim)
            if self.check_values:
                norms = np.linalg.norm(emb[:count], axis=1) if count else np.ones(0)
                if not (np.isfinite(emb).all() and np.all(np.abs(norms - 1) <= 1e-3) and not emb[count:].any()):
                    raise self._damaged(f"image row {row} holds crop features that are not {count} unit vectors "
                                        "followed by zeros")
            emb = emb[:count]
        return masks, emb

    # -- questions ----------------------------------------------------------------------------------
    def question_keys(self) -> list[str]:
        try:
            qkey = self._open()[1]["qkey"][:]
        except _STORE_ERRORS as e:
            raise self._damaged(f"the question keys cannot be read ({_reason(e)})") from None
        return [k.decode() if isinstance(k, bytes) else str(k) for k in qkey]

    def question_row(self, key: str) -> int | None:
        if self._qrows is None:
            self._qrows = {k: i for i, k in enumerate(self.question_keys())}
        return self._qrows.get(str(key))

    def read_question(self, q: int) -> tuple[int, str, np.ndarray, np.ndarray]:
        """(image row, query sha256, top indices [k], scores [k]) of question row ``q``, checked."""
        sel = self._open()[1]
        try:
            image_row = int(sel["image_row"][q])
            sha = sel["query_sha"][q]
            idx = np.asarray(sel["top_idx"][q], np.int64)
            scores = np.asarray(sel["top_score"][q], np.float32)
        except _STORE_ERRORS as e:
            raise self._damaged(f"question row {q} cannot be read ({_reason(e)})") from None
        sha = sha.decode() if isinstance(sha, bytes) else str(sha)
        k = int((idx >= 0).sum())
        if self.check_values:
            m = self.manifest
            if not 0 <= image_row < m.rows:
                raise self._damaged(f"question row {q} points at image row {image_row} (0..{m.rows - 1})")
            if idx.shape != (m.top_k,) or (idx[:k] < 0).any() or (idx[k:] != -1).any() or len(set(idx[:k])) != k:
                raise self._damaged(f"question row {q} holds top indices {idx.tolist()}, not a -1-padded list of "
                                    f"distinct masks")
            hi = float(np.abs(scores[:k]).max()) if k else 0.0
            if not (np.isfinite(scores).all() and hi <= SCORE_BOUND):
                raise self._damaged(f"question row {q} holds scores no cosine has (max |s| {hi:.4g})")
        return image_row, sha, idx[:k], scores[:k]

    def entry(self, key: str) -> A3Entry | None:
        """The labels of question ``key`` (:func:`shared.a3_queries.question_key`); None when not cached."""
        q = self.question_row(key)
        if q is None:
            return None
        image_row, sha, idx, scores = self.read_question(q)
        image_key = self.keys()[image_row]
        if not image_key:
            raise self._damaged(f"question {key!r} points at image row {image_row}, whose image failed")
        masks, _ = self.read_image(image_row)
        if self.check_values and len(idx) and int(idx.max()) >= len(masks):
            raise self._damaged(f"question {key!r} selects mask {int(idx.max())} of image row {image_row}, which "
                                f"holds {len(masks)}")
        return A3Entry(image_key=image_key, query_sha256=sha, labels=masks[idx].astype(np.float32), scores=scores)

    def identity(self) -> dict:
        """Who taught a run (JSON-able): the manifest's identity plus this copy's path and manifest digest."""
        return {**self.manifest.identity(), "format": self.manifest.storage, "path": str(self.path.resolve()),
                "manifest_sha256": sha256_file(self.path / MANIFEST_NAME), "rows": self.manifest.rows}


def open_a3_cache(path: str | Path, *, check_values: bool = True) -> A3Cache:
    if not Path(path).is_dir():
        raise MedAlignError(f"cache not found: {path}")
    return A3Cache(path, check_values=check_values)


__all__ = ["A3Cache", "A3Entry", "is_a3_cache", "open_a3_cache"]
