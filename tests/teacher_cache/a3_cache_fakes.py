"""Test helper: a fake SAM (the interface of teacher_cache.a3tune.sam), data sets and a test view.

The fake generator is deterministic in the view's pixels: it proposes boxes on a fixed grid and keeps
those whose mean intensity is above the view's, so a uniform image yields no mask ("no crop, no
labels"). Everything else is the real code: the settings and mask classes of
``teacher_cache.a3tune.sam`` and the geometry of ``teacher_cache.a3tune.geometry``. :func:`install`
puts the fake module into ``sys.modules`` for one test.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

from teacher_cache.a3tune import sam as real_sam
from teacher_cache.a3tune.sam import WeakMask


class FakeSam:
    arch = "fake"
    calls = 0

    def to_json(self):
        return {"format": "fake", "arch": "fake"}


def load_sam(path, device="cpu"):
    return FakeSam()


def generate_masks(sam, view, settings):
    FakeSam.calls += 1
    assert view.shape == (256, 256, 3) and view.dtype == np.uint8
    gray = view.astype(np.float32).mean(axis=2)
    out = []
    step = 256 // settings.points_per_side
    for y in range(8, 240, step * 2):
        for x in range(8, 240, step * 2):
            h, w = 20 + (x % 37), 20 + (y % 29)
            if gray[y:y + h, x:x + w].mean() > gray.mean() + 1:
                seg = np.zeros((256, 256), bool)
                seg[y:y + h, x:x + w] = gray[y:y + h, x:x + w] > gray[y:y + h, x:x + w].mean() - 20
                ys, xs = np.nonzero(seg)
                if len(ys):
                    box = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min()))
                    out.append(WeakMask(seg, box, int(seg.sum()), 0.9, 0.9))
    return out


def install(monkeypatch) -> None:
    """The fake ``teacher_cache.a3tune.sam`` module (the real one with the fake loader and generator),
    for one test."""
    sam = types.ModuleType("teacher_cache.a3tune.sam")
    sam.__dict__.update(vars(real_sam))
    sam.__dict__.update(load_sam=load_sam, generate_masks=generate_masks)
    monkeypatch.setitem(sys.modules, "teacher_cache.a3tune.sam", sam)


def nested_shapes() -> np.ndarray:
    """A SAM view with three nested shapes (grey 100, 150, disc 230) on a dark background, 256 x 256 x 3
    (the tiny SAM's thresholds 60 / 120 / 180 give one mask per shape)."""
    import cv2

    v = np.full((256, 256, 3), 20, np.uint8)
    cv2.rectangle(v, (40, 40), (200, 180), (100, 100, 100), -1)
    cv2.rectangle(v, (70, 60), (170, 160), (150, 150, 150), -1)
    cv2.circle(v, (120, 110), 30, (230, 230, 230), -1)
    return v


def make_dataset(root: Path, n_images: int = 5, seed: int = 0, uniform: int = 1) -> Path:
    """``root/images/*.png`` (non-square, the last ``uniform`` ones a flat grey) and ``root/train.json``
    with two questions per image (VQA-RAD style, ``image_organ`` set)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    organs = ["CHEST", "ABD", "HEAD"]
    for i in range(n_images):
        if i >= n_images - uniform:
            arr = np.full((40, 60, 3), 128, np.uint8)
        else:
            arr = (rng.random((48 + 8 * i, 64, 3)) * 60).astype(np.uint8)
            arr[10:30, 12 + i:40 + i] += 150
        Image.fromarray(arr).save(root / "images" / f"img{i}.png")
        for j in range(2):
            records.append({"id": 10 * i + j, "image": f"images/img{i}.png", "image_organ": organs[i % 3],
                            "conversations": [{"from": "human", "value": f"<image>\nIs there a lesion number {j}?"},
                                              {"from": "gpt", "value": "yes"}]})
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


FAST = {"points_per_side": 4, "crop_n_layers": 0}  # a partial override, as a --sam-settings file may be


def memo_clip(monkeypatch) -> None:
    """Load each BiomedCLIP directory once per test session (inference only, so sharing it changes nothing)."""
    import teacher_cache.a3tune.biomedclip as bc

    real = _REAL_LOAD.setdefault("f", bc.load_biomedclip)

    def load(directory, device="cpu", *, with_text=True):
        key = (str(directory), str(device))
        if key not in _CLIPS:
            _CLIPS[key] = real(directory, device)
        return _CLIPS[key]

    monkeypatch.setattr(bc, "load_biomedclip", load)


_CLIPS: dict = {}
_REAL_LOAD: dict = {}


def fake_sam_file(path: Path) -> Path:
    """A stand-in for the .pth (the fake loader never reads it; the build hashes it)."""
    path.write_bytes(b"fake sam weights")
    return path
