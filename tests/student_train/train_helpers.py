"""Builders for student_train recipe tests: image folders, datasets and teacher caches.

(Tiny students come from the ``tiny_student_dirs`` fixtures in ``conftest.py``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cache_helpers import write_cache
from shared.images import sha256_file

def write_images(root: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` small RGB images of varied (mostly non-square) sizes; returns their relative paths."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        w, h = [(40, 24), (24, 40), (32, 32), (50, 30)][i % 4]
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        rel = f"img/{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / rel)
        names.append(rel)
    return names


QUESTIONS = ["Is there a mass?", "What organ is shown in this image?", "Is the liver normal?",
             "Where is the lesion located?", "Are the kidneys enlarged?", "What imaging modality was used?"]
ANSWERS = ["yes", "the chest", "no", "right lower lobe", 3, "CT"]


def write_records(path: Path, images: list[str], n: int | None = None) -> list[dict]:
    n = len(images) if n is None else n
    recs = [{"id": i if i % 2 else f"q{i}", "image": images[i % len(images)],
             "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
                               {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}],
             "answer_type": "CLOSED"} for i in range(n)]
    path.write_text(json.dumps(recs, indent=1))
    return recs


def teacher_arrays(n_rows: int, n_tokens: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Valid teacher signals: cosine-similarity matrices and non-negative attention vectors."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_rows, n_tokens, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    sims = feats @ feats.transpose(0, 2, 1)
    attns = rng.random((n_rows, n_tokens)).astype(np.float32) + 0.05
    return sims, attns


def write_teacher_cache(out: Path, image_root: Path, images: list[str], grid: int, *, skip: tuple = (),
                        index_paths: bool = True, seed: int = 1, storage: str = "zarr"):
    """A cache over ``images`` (minus ``skip``) keyed by the real files' sha256.

    Returns (cache path, {rel: (sim, attn)}) with the arrays as written.
    """
    kept = [p for p in images if p not in skip]
    sims, attns = teacher_arrays(len(kept), grid * grid, seed)
    keys = [sha256_file(image_root / p) for p in kept]
    index = {p: r for r, p in enumerate(kept)} if index_paths else {}
    write_cache(out, sims, attns, keys, index, format=storage)
    return out, {p: (sims[r], attns[r]) for r, p in enumerate(kept)}

