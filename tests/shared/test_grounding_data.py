"""The grounding data set: deterministic, masks match the drawn lesion, answers match the masks."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from shared.grounding_data import GRID, PATCH_COVER, PATCH_SIZE, load_grid_masks, make_grounding_dataset

SIZES = {"train": 6, "val": 2, "test": 8}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = make_grounding_dataset(tmp_path / "a", 3, SIZES)
    b = make_grounding_dataset(tmp_path / "b", 3, SIZES)
    c = make_grounding_dataset(tmp_path / "c", 4, SIZES)
    for f in sorted(a["images"].iterdir()):
        assert f.read_bytes() == (b["images"] / f.name).read_bytes()
        assert (a["masks"] / f.name).read_bytes() == (b["masks"] / f.name).read_bytes()
    for split in SIZES:
        assert a[split].read_text() == b[split].read_text()
    assert a["grid_masks"].read_text() == b["grid_masks"].read_text()
    assert any((a["images"] / f.name).read_bytes() != f.read_bytes() for f in c["images"].iterdir())


def test_masks_are_the_bright_disc_and_answers_follow_them(tmp_path):
    p = make_grounding_dataset(tmp_path, 0, SIZES)
    grids = load_grid_masks(p["grid_masks"])
    recs = [r for split in SIZES for r in json.loads(p[split].read_text())]
    assert len(recs) == 3 * sum(SIZES.values())
    by_image: dict[str, dict[str, str]] = {}
    for r in recs:
        by_image.setdefault(r["image"], {})[r["kind"]] = r["conversations"][1]["value"]
    for name, ans in by_image.items():
        img = np.asarray(Image.open(p["images"] / name), dtype=np.float64)
        mask = np.asarray(Image.open(p["masks"] / name)) > 127
        assert mask.sum() > 50
        # the lesion is the bright disc: its pixels are far brighter than the rest of the image
        assert img[mask].mean() > 190 and img[~mask].mean() < 120
        ys, xs = np.nonzero(mask)
        cx, cy, h = (xs.mean() + 0.5), (ys.mean() + 0.5), img.shape[0] / 2
        assert xs.max() < h or xs.min() >= h  # the whole disc inside one half, both ways
        assert ys.max() < h or ys.min() >= h
        left, upper = cx < h, cy < h
        assert ans["left"] == ("yes" if left else "no")
        assert ans["upper"] == ("yes" if upper else "no")
        assert ans["quadrant"] == f"{'upper' if upper else 'lower'} {'left' if left else 'right'}"
        # the grid mask: patches the mask covers to at least PATCH_COVER, recomputed patch by patch
        expect = [mask[i * PATCH_SIZE:(i + 1) * PATCH_SIZE, j * PATCH_SIZE:(j + 1) * PATCH_SIZE].mean() >= PATCH_COVER
                  for i in range(GRID) for j in range(GRID)]
        assert grids[name].tolist() == expect and any(expect)


def test_answers_are_balanced_enough_that_a_prior_cannot_solve_it(tmp_path):
    p = make_grounding_dataset(tmp_path, 0, {"test": 200})
    recs = json.loads(p["test"].read_text())
    quads = [r["conversations"][1]["value"] for r in recs if r["kind"] == "quadrant"]
    counts = {q: quads.count(q) for q in set(quads)}
    assert len(counts) == 4 and max(counts.values()) < 0.35 * len(quads)
