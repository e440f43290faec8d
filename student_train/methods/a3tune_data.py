"""A3Tune's teacher side of the data: the A3 cache checked against the records before training,
and the weak masks of each question in a sample and a batch.

Plan time (:class:`A3Lookup`, one call per record): the question's entry must be in the cache
(unless ``--allow-missing``) and hold the hash of the query text the cache's template gives for
this record (a question edited after the build is refused, naming the record). Read time
(:class:`A3Teacher`, per DataLoader worker, opened lazily): the image's sha256 must be the entry's
image key (an image edited after the build is refused), like MedAlign's stale-image check.

Batch fields: ``a3_labels`` [B, K, N] float32 (0/1 on the grid, K = the batch's most masks, padded
with zeros), ``a3_label_mask`` [B, K] bool, ``teacher_mask`` [B] bool (the question is in the cache;
it may still have K = 0 masks, then its L_att is 0).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from shared.errors import MedAlignError


def _a3():
    """The A3 cache reader and the query texts (shared.cache.a3tune, shared.a3_queries): one seam, so
    the training tests can give a stand-in cache of labels they chose."""
    from shared import a3_queries
    from shared.cache import a3tune

    return a3tune, a3_queries


def manifest_value(cache, key: str):
    m = cache.manifest
    return m.get(key) if isinstance(m, dict) else getattr(m, key, None)


def open_checked(path: str, n_tokens: int):
    """Open the A3 cache at ``path`` and check its grid against the student's N image tokens."""
    a3tune, _ = _a3()
    if not Path(path).exists():
        raise MedAlignError(f"--cache {path} does not exist")
    if not a3tune.is_a3_cache(path):
        raise MedAlignError(f"--cache {path} is not an A3 cache (--method a3tune needs one from "
                            "medalign-cache build --signals a3tune)")
    cache = a3tune.open_a3_cache(path)
    if int(cache.num_tokens) != int(n_tokens):
        g = cache.grid
        raise MedAlignError(f"the A3 cache {path} holds masks on a {g}x{g} grid (N = {cache.num_tokens}) but the "
                            f"student has {n_tokens} image tokens per image; build the cache with --grid "
                            "matching the student (or --student MODEL_DIR)")
    return cache


class A3Lookup:
    """``lookup(record) -> question key or None`` for :func:`student_train.data.build_samples`."""

    def __init__(self, path: str, n_tokens: int):
        self.path = str(path)
        self.cache = open_checked(self.path, n_tokens)
        _, self.queries = _a3()
        self.template = manifest_value(self.cache, "template")

    def __call__(self, rec: dict) -> str | None:
        key = self.queries.question_key(rec)
        entry = self.cache.entry(key)
        if entry is None:
            return None
        if self.template is not None:
            text = self.queries.query_text(rec, self.template)
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if entry.query_sha256 and entry.query_sha256 != digest:
                raise MedAlignError(
                    f"question {key}: its query text changed since the A3 cache {self.path} was built "
                    f"(template {self.template!r}: sha256 {digest[:12]}... is not the cached "
                    f"{entry.query_sha256[:12]}...); rebuild the cache (medalign-cache build --signals a3tune "
                    "--resume) or restore the data")
        return key

    def close(self) -> None:
        self.cache.close()


class A3Teacher:
    """The per-sample weak masks, read lazily in the process that reads (picklable)."""

    def __init__(self, path: str, n_tokens: int):
        self.path = str(path)
        self.n_tokens = int(n_tokens)
        self._cache = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def _open(self):
        if self._cache is None:
            a3tune, _ = _a3()
            self._cache = a3tune.open_a3_cache(self.path)
        return self._cache

    def fields(self, key: str | None, image: str, digest: str) -> dict[str, Any]:
        """The teacher fields of one sample (``key`` None: no entry)."""
        if key is None:
            return {"a3_labels": torch.zeros(0, self.n_tokens), "teacher_mask": False}
        entry = self._open().entry(key)
        if entry is None:
            raise MedAlignError(f"question {key} disappeared from the A3 cache {self.path}")
        if entry.image_key and entry.image_key != digest:
            raise MedAlignError(f"image {image} changed since the A3 cache {self.path} was built (its sha256 "
                                f"{digest[:12]}... is not the entry's {entry.image_key[:12]}...); rebuild the "
                                "cache (medalign-cache build --signals a3tune) or restore the image")
        labels = torch.as_tensor(entry.labels, dtype=torch.float32).reshape(-1, self.n_tokens)
        return {"a3_labels": labels, "teacher_mask": True}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = len(items)
        n = items[0]["a3_labels"].shape[-1]
        k = max(int(it["a3_labels"].shape[0]) for it in items)
        labels = torch.zeros(b, k, n, dtype=torch.float32)
        label_mask = torch.zeros(b, k, dtype=torch.bool)
        for i, it in enumerate(items):
            ki = int(it["a3_labels"].shape[0])
            labels[i, :ki] = it["a3_labels"]
            label_mask[i, :ki] = True
        return {"a3_labels": labels, "a3_label_mask": label_mask,
                "teacher_mask": torch.tensor([bool(it["teacher_mask"]) for it in items], dtype=torch.bool)}
