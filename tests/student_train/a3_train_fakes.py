"""A small stand-in for the A3 cache reader (``shared.cache.a3tune`` / ``shared.a3_queries``) for the
A3Tune training tests, so they choose each question's labels: a directory with ``manifest.json`` and
``entries.json``, and :func:`use_fake_a3` to point the training code at it. The real cache's way into
training is tested end to end in ``tests/test_pipeline_a3tune.py``.
"""

from __future__ import annotations

import hashlib
import json
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.images import sha256_file
from shared.records import question_text

TEMPLATE = "Medical image of pathology."


def question_key(rec: dict) -> str:
    return str(rec["id"])


def query_text(rec: dict, template: str) -> str:
    return template + question_text(rec)


@dataclass
class FakeEntry:
    image_key: str
    query_sha256: str
    labels: np.ndarray
    scores: np.ndarray


class FakeA3Cache:
    def __init__(self, path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.grid = int(self.manifest["grid"])
        self.num_tokens = int(self.manifest["num_tokens"])
        self._entries = json.loads((self.path / "entries.json").read_text())

    def identity(self) -> dict:
        return {"signals": "a3tune", "grid": self.grid, "template": self.manifest["template"]}

    def entry(self, key: str):
        e = self._entries.get(key)
        if e is None:
            return None
        labels = np.asarray(e["labels"], dtype=np.float32).reshape(-1, self.num_tokens)
        return FakeEntry(e["image_key"], e["query_sha256"], labels, np.ones(len(labels), np.float32))

    def close(self) -> None:
        pass


def is_a3_cache(path) -> bool:
    p = Path(path) / "manifest.json"
    return p.is_file() and json.loads(p.read_text()).get("signals") == "a3tune"


FAKE_CACHE_MODULE = types.SimpleNamespace(open_a3_cache=FakeA3Cache, is_a3_cache=is_a3_cache)
FAKE_QUERIES_MODULE = types.SimpleNamespace(question_key=question_key, query_text=query_text)


def use_fake_a3(monkeypatch) -> None:
    """Make student_train's A3Tune data code read the fake cache."""
    from student_train.methods import a3tune_data

    monkeypatch.setattr(a3tune_data, "_a3", lambda: (FAKE_CACHE_MODULE, FAKE_QUERIES_MODULE))


def write_fake_a3_cache(out: Path, image_root: Path, records: list[dict], grid: int, *, k: int = 3,
                        skip: tuple = (), empty: tuple = (), seed: int = 0) -> dict[str, np.ndarray]:
    """A fake A3 cache over ``records`` (minus the ids in ``skip``; the ids in ``empty`` get no masks).

    Returns {question key: labels [k, N]}.
    """
    rng = np.random.default_rng(seed)
    n = grid * grid
    entries, labels = {}, {}
    for rec in records:
        key = question_key(rec)
        if rec["id"] in skip:
            continue
        kk = 0 if rec["id"] in empty else k
        m = (rng.random((kk, n)) < 0.3).astype(np.float32)
        if kk:
            m[:, 0] = 1.0  # never an empty mask
        labels[key] = m
        entries[key] = {"image_key": sha256_file(image_root / rec["image"]),
                        "query_sha256": hashlib.sha256(query_text(rec, TEMPLATE).encode()).hexdigest(),
                        "labels": m.tolist()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps({"signals": "a3tune", "grid": grid, "num_tokens": n,
                                                   "template": TEMPLATE, "top_k": k}))
    (out / "entries.json").write_text(json.dumps(entries))
    return labels


if __name__ == "__main__":  # `python a3_train_fakes.py TRAIN-ARGS...`: medalign-train reading the fake cache (torchrun)
    import sys

    from student_train import cli
    from student_train.methods import a3tune_data

    a3tune_data._a3 = lambda: (FAKE_CACHE_MODULE, FAKE_QUERIES_MODULE)
    cli.main(sys.argv[1:])
