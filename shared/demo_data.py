"""A small generated VQA dataset for demos and tests: synthetic 'scans' with or without a lesion.

Each image is a noisy grey background, sometimes with one bright blob on the left or right half.
Questions: "Is there a lesion in this image?" (CLOSED, yes/no) and, when there is one, "Which
side is the lesion on?" (OPEN, left/right). Deterministic for a given seed; nothing downloaded.

It lives in ``shared`` because both demos generate it: ``medalign-cache demo`` (teacher_cache, which
may import only shared) and ``medalign-eval demo`` (evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


#: What LLaVA-Med's prepared VQA files append to closed questions (train and test alike here).
CLOSED_SUFFIX = " Please choose from the following two options: [yes, no]"


def make_scans(root: str | Path, count: int, seed: int = 0) -> list[dict]:
    """Write ``count`` PNG scans of mixed sizes and modes under ``root``; returns their descriptions."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    scans = []
    for i in range(count):
        h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        img = 40 + 20 * rng.standard_normal((h, w))
        side = ("left", "right", None)[i % 3]
        if side is not None:
            yy, xx = np.mgrid[0:h, 0:w]
            cx = rng.uniform(0.15, 0.4) * w if side == "left" else rng.uniform(0.6, 0.85) * w
            cy, r = rng.uniform(0.25, 0.75) * h, rng.uniform(5, 12)
            img = img + 180 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        arr = np.clip(img, 0, 255).astype(np.uint8)
        pil = Image.fromarray(arr, "L") if i % 2 else Image.fromarray(np.stack([arr] * 3, -1), "RGB")
        name = f"scan{i:03d}.png"
        pil.save(root / name)
        scans.append({"image": name, "lesion": side})
    return scans


def vqa_records(scans: list[dict], start_id: int = 0) -> list[dict]:
    """LLaVA-style records (ids from ``start_id``) asking about each scan."""
    recs = []

    def add(image, question, answer, kind):
        recs.append({"id": start_id + len(recs), "image": image, "answer_type": kind,
                     "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                       {"from": "gpt", "value": answer}]})

    for s in scans:
        add(s["image"], f"Is there a lesion in this image?{CLOSED_SUFFIX}", "no" if s["lesion"] is None else "yes",
            "CLOSED")
        if s["lesion"] is not None:
            add(s["image"], "Which side is the lesion on?", s["lesion"], "OPEN")
    return recs


def make_demo_dataset(root: str | Path, images: int = 24, test_fraction: float = 0.25, seed: int = 0) -> dict:
    """images/ + train.json + test.json under ``root``; returns the paths."""
    root = Path(root)
    scans = make_scans(root / "images", images, seed)
    n_test = max(1, int(round(len(scans) * test_fraction)))
    train, test = vqa_records(scans[n_test:]), vqa_records(scans[:n_test], start_id=10_000)
    (root / "train.json").write_text(json.dumps(train, indent=1))
    (root / "test.json").write_text(json.dumps(test, indent=1))
    return {"images": root / "images", "train": root / "train.json", "test": root / "test.json"}
