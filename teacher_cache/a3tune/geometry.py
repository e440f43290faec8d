"""Where A3Tune's masks live: the SAM input view, the student's patch grid, the CLIP crops.

Two geometries (``--geometry``):

- ``pad`` (default): SAM sees the student's own square view, LLaVA's pad-to-square
  (``shared.images.expand2square`` with the student processor's mean colour), resized to 256 x 256,
  in RGB. Masks go to the G x G grid by nearest sampling at the cell centres, so mask cell i is
  the student's patch i.
- ``stretch``: the authors' whole path. ``cv2.imread`` + ``cv2.resize(image, (256, 256))``: the
  image stretched to a square and fed to SAM in OpenCV's BGR order; their training then maps each
  256 x 256 mask with ``ToPILImage``, ``Resize(224, NEAREST)``, ``CenterCrop(224)``,
  ``Resize(24, NEAREST)`` (``llava-med-1.5/llava/train/train.py``, ``mask_transform``) while the
  student pads, so on non-square images masks and patches do not line up.

Both resize the view with OpenCV's bilinear ``cv2.resize`` (the authors' call); only the geometry
and the channel order differ.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from shared.errors import MedAlignError
from shared.images import expand2square
from teacher_cache.a3tune.sam import VIEW_SIZE, WeakMask

GEOMETRIES = ("pad", "stretch")
#: the authors' intermediate mask size (``n_px`` of their mask transform)
STRETCH_MASK_PX = 224


def _check(geometry: str) -> None:
    if geometry not in GEOMETRIES:
        raise MedAlignError(f"--geometry {geometry!r}: choose one of {', '.join(GEOMETRIES)}")


def sam_view(image: Image.Image, geometry: str, background: tuple[int, int, int]) -> np.ndarray:
    """The [256, 256, 3] uint8 array SAM sees: RGB pad-to-square (``pad``), or the stretched image
    in BGR order (``stretch``, the authors'; ``background`` unused)."""
    _check(geometry)
    image = image.convert("RGB")
    if geometry == "pad":
        arr = np.asarray(expand2square(image, tuple(background)))
    else:
        arr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])  # RGB -> BGR, as cv2.imread gives
    return cv2.resize(arr, (VIEW_SIZE, VIEW_SIZE), interpolation=cv2.INTER_LINEAR)


def _cell_centres(mask: np.ndarray, size: int) -> np.ndarray:
    """The pixel under each cell's centre: cell i of ``size`` samples pixel
    ``floor((i + 0.5) * side / size)`` (``pad``: exact, where PIL's fixed-point nearest can pick
    the pixel before when a centre falls on a pixel boundary)."""
    side = mask.shape[0]
    idx = np.floor((np.arange(size) + 0.5) * side / size).astype(np.int64)
    return mask[idx][:, idx].astype(bool)


def _nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """PIL nearest resampling of a square 0/1 mask to size x size (what torchvision's
    ``Resize(NEAREST)`` does to a PIL image)."""
    img = Image.fromarray(mask.astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST)).astype(bool)


def _center_crop(mask: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)`` of a square mask at least ``size`` wide."""
    h, w = mask.shape
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return mask[top:top + size, left:left + size]


def mask_to_grid(mask: np.ndarray, geometry: str, grid: int) -> np.ndarray:
    """One [256, 256] mask -> [grid, grid] bool cells (row-major = the student's patch order)."""
    _check(geometry)
    if geometry == "pad":
        return _cell_centres(mask, grid)
    small = _center_crop(_nearest(mask, STRETCH_MASK_PX), STRETCH_MASK_PX)
    return _nearest(small, grid)


def masks_to_grid(masks: np.ndarray, geometry: str, grid: int) -> np.ndarray:
    """[M, 256, 256] bool -> [M, grid * grid] bool, cell ``r * grid + c`` = the student's patch."""
    _check(geometry)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [M, H, W], got shape {masks.shape}")
    out = np.zeros((masks.shape[0], grid * grid), dtype=bool)
    for i, m in enumerate(masks):
        out[i] = mask_to_grid(m, geometry, grid).reshape(-1)
    return out


def crop_for_clip(view: np.ndarray, mask: WeakMask) -> np.ndarray:
    """The authors' ``get_crops`` (mode ``crops``): the view with pixels outside the mask zeroed,
    cut to the mask's SAM box ``[y:y + h, x:x + w]`` (so, as theirs, without the box's last row
    and column: SAM's w and h are x_max - x_min). [h, w, 3] uint8, in the view's channel order."""
    x, y, w, h = (int(v) for v in mask.bbox)
    kept = view * mask.segmentation[:, :, None].astype(view.dtype)
    return np.ascontiguousarray(kept[y:y + h, x:x + w])
