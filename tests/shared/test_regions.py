"""shared.regions: the regions file format and the patch each region covers in the student's view.

The patch labels are checked against a pixel-by-pixel loop written here (canvas built by hand,
pixel centres, majority with the documented tie rule), on non-square images whose side is not a
multiple of the grid, and against the student's own pixels (expand2square + the image processor).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from shared.errors import MedAlignError
from shared.regions import PADDING, patch_labels, read_mask, read_regions, write_regions


def loop_labels(mask: np.ndarray, grid: int) -> list[int]:
    """Straightforward reference: pad to a square by hand, count pixels per patch by their centres."""
    h, w = mask.shape
    side = max(w, h)
    top, left = (side - h) // 2, (side - w) // 2
    out = []
    for r in range(grid):
        for c in range(grid):
            votes = Counter()
            for y in range(side):
                for x in range(side):
                    if r * side / grid <= y + 0.5 < (r + 1) * side / grid and c * side / grid <= x + 0.5 < (c + 1) * side / grid:
                        inside = top <= y < top + h and left <= x < left + w
                        votes[int(mask[y - top, x - left]) if inside else PADDING] += 1
            best = max(votes.values())
            tied = [v for v, n in votes.items() if n == best]
            labels = sorted(v for v in tied if v != PADDING)
            out.append(labels[0] if labels else PADDING)
    return out


def blocks(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.int64)
    m[: h // 2, : w // 3] = 1
    m[h // 3:, w // 2:] = 2
    m[h - 3:, :4] = 7
    return m


@pytest.mark.parametrize("h,w,grid", [(24, 40, 4), (40, 24, 4), (20, 30, 4), (33, 17, 6), (16, 16, 4)])
def test_patch_labels_match_pixel_loop(h, w, grid):
    mask = blocks(h, w)
    assert patch_labels(mask, grid).tolist() == loop_labels(mask, grid)


def test_known_labels_non_square():
    """40 x 24 image, G = 4: the square is 40 px, patches 10 px, the image rows 8..31 of it."""
    mask = np.zeros((24, 40), dtype=np.int64)
    mask[:, 20:] = 1  # right half lesion
    got = patch_labels(mask, 4).reshape(4, 4)
    # row 0 (canvas rows 0-9): 8 padding rows vs 2 image rows -> padding; row 3 (30-39): 2 image rows -> padding
    assert (got[0] == PADDING).all() and (got[3] == PADDING).all()
    assert got[1].tolist() == [0, 0, 1, 1] and got[2].tolist() == [0, 0, 1, 1]


def test_ties_prefer_smallest_label_and_padding_last():
    mask = np.zeros((2, 4), dtype=np.int64)  # canvas 4 x 4, rows 1..2 image; grid 1 -> one patch of 16 px
    mask[:, 2:] = 3
    # 8 padding px, 4 px of 0, 4 px of 3: padding wins outright
    assert patch_labels(mask, 1).tolist() == [PADDING]
    # grid 2: top-left patch = 2 padding + 2 label-0 -> tie, the label wins
    assert patch_labels(mask, 2).tolist() == [0, 3, 0, 3]


def test_grid_finer_than_the_image_takes_the_centre_pixel():
    mask = np.arange(9).reshape(3, 3)
    got = patch_labels(mask, 6).reshape(6, 6)
    assert got[0, 0] == 0 and got[5, 5] == 8 and got[2, 3] == 4


def test_labels_follow_the_student_pixels(tmp_path):
    """A bright block where the mask says lesion: the patches the student sees bright are the lesion ones."""
    from shared.images import expand2square
    from student_train.inputs import load_image_processor
    from student_train.tiny import save_tiny_llava

    model = save_tiny_llava(tmp_path / "m", "llama", layers=1, seed=0)  # image 32 px, patch 8 px, G = 4
    proc = load_image_processor(model)
    mask = np.zeros((24, 40), dtype=np.int64)
    mask[2:12, 10:30] = 1  # canvas rows 10..19 (patch row 1), cols 10..29 (patch cols 1, 2)
    img = Image.fromarray(np.where(mask[..., None] == 1, 255, 20).astype(np.uint8).repeat(3, axis=2))
    px = proc(images=expand2square(img, (0, 0, 0)), return_tensors="pt")["pixel_values"][0].numpy()
    bright = px.mean(0).reshape(4, 8, 4, 8).mean(axis=(1, 3)).reshape(-1) > 0.5
    assert ((patch_labels(mask, 4) == 1) == bright).all()


def test_write_read_round_trip(tmp_path):
    m1 = blocks(24, 40)
    m2 = np.full((10, 12), 300, dtype=np.int64)  # 16-bit
    file = write_regions(tmp_path / "r", {"a/b.png": m1, "c.jpg": m2}, {0: "background", 1: "lesion"})
    reg = read_regions(tmp_path / "r")
    assert read_regions(file).masks == reg.masks
    assert reg.has("a/b.png") and reg.has("./a/b.png") and not reg.has("b.png")
    assert (reg.mask("a/b.png") == m1).all() and (reg.mask("c.jpg") == m2).all()
    assert reg.name(1) == "lesion" and reg.name(7) == "label_7" and reg.name(PADDING) == "padding"
    doc = json.loads(file.read_text())
    assert doc["format"] == "medalign-regions" and doc["version"] == 1


def test_bad_inputs(tmp_path):
    with pytest.raises(MedAlignError, match="no regions.json"):
        read_regions(tmp_path)
    (tmp_path / "regions.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(MedAlignError, match="not a medalign-regions"):
        read_regions(tmp_path)
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(MedAlignError, match="colour"):
        read_mask(tmp_path / "colour.png")
    Image.fromarray(np.full((4, 4, 3), 5, dtype=np.uint8)).save(tmp_path / "grey.png")
    assert (read_mask(tmp_path / "grey.png") == 5).all()
