"""Test helper: a fake SAM and geometry (the interfaces of teacher_cache.a3tune.sam / geometry), data sets.

The fake generator is deterministic in the view's pixels: it proposes boxes on a fixed grid and keeps
those whose mean intensity is above the view's, so a uniform image yields no mask ("no crop, no
labels"). :func:`install` puts the two fake modules into ``sys.modules`` for one test.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SamSettings:
    points_per_side: int = 8
    points_per_batch: int = 128
    pred_iou_thresh: float = 0.5
    stability_score_thresh: float = 0.5
    box_nms_thresh: float = 0.8
    crop_n_layers: int = 1
    crop_n_points_downscale_factor: int = 2
    crop_nms_thresh: float = 0.8
    min_mask_region_area: int = 200
    max_area: int = 40_000

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class WeakMask:
    segmentation: np.ndarray
    bbox: tuple[int, int, int, int]
    area: int
    predicted_iou: float
    stability_score: float


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


def sam_view(image, geometry, background):
    from shared.images import expand2square

    if geometry == "pad":
        return np.asarray(expand2square(image, background).resize((256, 256)), np.uint8).copy()
    return np.ascontiguousarray(np.asarray(image.resize((256, 256)), np.uint8)[..., ::-1])


def masks_to_grid(masks, geometry, grid):
    idx = (np.arange(grid) * 256 // grid + 256 // (2 * grid))
    return masks[:, idx][:, :, idx].reshape(len(masks), grid * grid)


def crop_for_clip(view, mask):
    x, y, w, h = mask.bbox
    return (view * mask.segmentation[..., None])[y:y + h, x:x + w].astype(np.uint8)


def install(monkeypatch) -> None:
    """The fake ``teacher_cache.a3tune.sam`` and ``.geometry`` modules, for one test."""
    sam = types.ModuleType("teacher_cache.a3tune.sam")
    sam.__dict__.update(SamSettings=SamSettings, WeakMask=WeakMask, load_sam=load_sam, generate_masks=generate_masks,
                        FAST_SAM_SETTINGS=SamSettings(points_per_side=4, crop_n_layers=0))
    geo = types.ModuleType("teacher_cache.a3tune.geometry")
    geo.__dict__.update(GEOMETRIES=("pad", "stretch"), sam_view=sam_view, masks_to_grid=masks_to_grid,
                        crop_for_clip=crop_for_clip)
    monkeypatch.setitem(sys.modules, "teacher_cache.a3tune.sam", sam)
    monkeypatch.setitem(sys.modules, "teacher_cache.a3tune.geometry", geo)


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


FAST = {"points_per_side": 4, "crop_n_layers": 0}


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
