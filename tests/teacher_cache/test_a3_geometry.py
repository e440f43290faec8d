"""A3Tune's geometry: the SAM view (pad vs stretch), masks to the student's grid, CLIP crops."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from shared.errors import MedAlignError
from teacher_cache.a3tune.geometry import GEOMETRIES, crop_for_clip, masks_to_grid, sam_view
from teacher_cache.a3tune.sam import WeakMask

BACKGROUND = (122, 116, 104)  # the CLIP mean colour LLaVA pads with


def wide_image(w=320, h=160, box=(80, 40, 240, 120)) -> Image.Image:
    """Black w x h image with a white rectangle box = (x0, y0, x1, y1), exclusive ends."""
    arr = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    arr[:, :, 2] = 7  # a blue tint, to see the channel order
    return Image.fromarray(arr)


def test_pad_view_is_the_students_square():
    img = wide_image()
    view = sam_view(img, "pad", BACKGROUND)
    padded = np.empty((320, 320, 3), np.uint8)
    padded[:] = BACKGROUND
    padded[80:240] = np.asarray(img)  # centred vertically: (320 - 160) // 2 = 80
    assert view.shape == (256, 256, 3) and view.dtype == np.uint8
    assert np.array_equal(view, cv2.resize(padded, (256, 256), interpolation=cv2.INTER_LINEAR))
    assert tuple(view[0, 0]) == BACKGROUND  # RGB


def test_stretch_view_is_the_authors(tmp_path):
    img = wide_image()
    path = tmp_path / "wide.png"
    img.save(path)
    view = sam_view(img, "stretch", BACKGROUND)
    theirs = cv2.resize(cv2.imread(str(path)), (256, 256))  # preprocess_image of the notebooks
    assert np.array_equal(view, theirs)
    assert view[0, 0, 0] == 7  # BGR: the blue tint comes first


def test_pad_mask_lands_on_the_right_cells():
    """The rectangle covers original x 80..240, y 40..120; padded (320 x 320, +80 rows) that is
    x 80..240, y 120..200, so on an 8 x 8 grid of 40 px cells: rows 3-4, columns 2-5."""
    img = wide_image()
    mask_view = sam_view(img, "pad", (0, 0, 0))[:, :, 0] > 127
    cells = masks_to_grid(mask_view[None], "pad", 8)[0].reshape(8, 8)
    expected = np.zeros((8, 8), bool)
    expected[3:5, 2:6] = True
    assert np.array_equal(cells, expected)
    # the same image in stretch geometry does not line up with the student's padded patches
    mask_stretch = sam_view(img, "stretch", (0, 0, 0))[:, :, 1] > 127
    assert not np.array_equal(masks_to_grid(mask_stretch[None], "stretch", 8)[0].reshape(8, 8), expected)


def test_pad_grid_is_cell_centre_nearest():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 256, 256)) > 0.5
    for grid in (8, 16, 24):
        out = masks_to_grid(masks, "pad", grid)
        centres = ((np.arange(grid) + 0.5) * 256 / grid).astype(int)
        ref = masks[:, centres][:, :, centres].reshape(3, -1)
        assert np.array_equal(out, ref)


@pytest.mark.parametrize("grid", [24, 16, 7])
def test_stretch_grid_is_the_authors_mask_transform(grid):
    """Their dataset's mask_transform on a float32 mask, as llava-med-1.5 train.py applies it."""
    rng = np.random.default_rng(grid)
    masks = np.zeros((4, 256, 256), bool)
    for m in masks:
        x, y = rng.integers(0, 200, 2)
        m[y:y + rng.integers(5, 56), x:x + rng.integers(5, 56)] = True
    masks[3] = rng.random((256, 256)) > 0.5
    tf = transforms.Compose([
        transforms.ToPILImage(),
        transforms.Resize(224, interpolation=transforms.InterpolationMode.NEAREST),
        transforms.CenterCrop(224),
        transforms.Resize(grid, interpolation=transforms.InterpolationMode.NEAREST),
        transforms.ToTensor(),
    ])
    ref = torch.stack([tf(torch.tensor(m, dtype=torch.float32).numpy())[0] for m in masks])
    out = masks_to_grid(masks, "stretch", grid)
    assert np.array_equal(out, ref.reshape(4, -1).numpy() > 0.5)


def test_crop_for_clip_is_the_authors_get_crops():
    rng = np.random.default_rng(1)
    view = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    seg = np.zeros((256, 256), bool)
    seg[30:90, 50:70] = True
    seg[60:70, 40:50] = True
    ys, xs = np.nonzero(seg)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min()))
    mask = WeakMask(segmentation=seg, bbox=bbox, area=int(seg.sum()), predicted_iou=0.9, stability_score=0.9)
    x1, y1, x2, y2 = bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]
    seg3 = np.array([seg, seg, seg]).transpose(1, 2, 0)
    theirs = np.multiply(view, seg3).astype("int")[int(y1):int(y2), int(x1):int(x2)].astype(np.uint8)
    crop = crop_for_clip(view, mask)
    assert crop.dtype == np.uint8 and np.array_equal(crop, theirs)
    assert crop.shape == (59, 29, 3)


def test_unknown_geometry():
    assert GEOMETRIES == ("pad", "stretch")
    with pytest.raises(MedAlignError, match="--geometry"):
        sam_view(wide_image(), "crop", BACKGROUND)
    with pytest.raises(MedAlignError, match="--geometry"):
        masks_to_grid(np.zeros((1, 256, 256), bool), "square", 8)
