"""Per-image region masks (organs, lesions) and the student patch each region covers.

The on-disk format (``medalign-regions``, version 1), written by :func:`write_regions` and read by
:func:`read_regions`; ``--regions`` of ``medalign-eval tsne`` takes the folder or its JSON file:

* ``regions.json`` in a folder::

      {"format": "medalign-regions", "version": 1,
       "labels": {"0": "background", "1": "lesion"},
       "masks": {"scan_0001.png": "masks/scan_0001.png", ...}}

  ``masks`` maps an image path as the data records name it (relative to ``--image-root``, ``/``
  separators) to a mask file relative to the folder of ``regions.json``; ``labels`` names the label
  values (a value a mask holds but ``labels`` does not name is called ``label_<v>``).
* a mask file is a single-channel PNG (8- or 16-bit), the size of its image (width x height), each
  pixel the integer label of the region it belongs to (0 background by convention). The grounding
  benchmark writes its lesion masks this way (1 lesion, 0 background); ``medalign-data regions
  --from slake`` converts SLAKE's ``imgs/xmlab*/mask.png``.

:func:`patch_labels` puts a mask through the student's geometry (``pad``: LLaVA's pad-to-square,
:func:`shared.images.expand2square`, then a resize of the square to the G x G patch grid) and gives
each patch the label most of its pixels hold. Pixels of the padding hold :data:`PADDING` (-1); a
patch that is mostly padding is labelled :data:`PADDING`. Ties go to the smallest label, the padding
losing every tie it is in.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from shared.errors import MedAlignError
from shared.images import resolve_image_path

REGIONS_FORMAT = "medalign-regions"
REGIONS_VERSION = 1
REGIONS_FILE = "regions.json"
#: The label of a patch (or canvas pixel) outside the image: the student's padding.
PADDING = -1


@dataclass(frozen=True)
class Regions:
    """A regions file: label names and, per image path, its mask file."""

    root: Path
    """The folder holding ``regions.json`` (mask paths are relative to it)."""
    labels: dict[int, str]
    masks: dict[str, str]

    def name(self, label: int) -> str:
        if label == PADDING:
            return "padding"
        return self.labels.get(int(label), f"label_{int(label)}")

    def has(self, rel: str) -> bool:
        return _norm(rel) in self.masks

    def mask(self, rel: str) -> np.ndarray:
        """The [H, W] int64 label mask of image ``rel`` (a :class:`MedAlignError` when it has none)."""
        key = _norm(rel)
        if key not in self.masks:
            raise MedAlignError(f"--regions {self.root}: no mask for image {rel!r}")
        return read_mask(resolve_image_path(self.root, self.masks[key]))


def _norm(rel: str) -> str:
    """Image paths as keys: posix separators, no ``./`` (as the cache's index keys them)."""
    return posixpath.normpath(str(rel).replace("\\", "/"))


def read_mask(path: str | Path) -> np.ndarray:
    """A mask PNG as [H, W] int64 labels. Grayscale (8/16-bit), palette (the indices) and RGB(A)
    images whose channels are equal are accepted; a colour mask is refused (name the colours as
    labels first)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except FileNotFoundError:
        raise MedAlignError(f"mask file not found: {path}") from None
    except OSError as e:
        raise MedAlignError(f"cannot read the mask {path} ({e})") from None
    if arr.ndim == 3:
        if mode not in ("RGB", "RGBA", "LA"):
            raise MedAlignError(f"mask {path}: unsupported image mode {mode}")
        chans = arr[..., :1] if mode == "LA" else arr[..., :3]
        if not (chans == chans[..., :1]).all():
            raise MedAlignError(f"mask {path} is a colour image; a mask holds one integer label per pixel")
        arr = chans[..., 0]
    return arr.astype(np.int64)


def read_regions(path: str | Path) -> Regions:
    """Read ``regions.json`` (or the folder holding it); every error names the file."""
    path = Path(path)
    file = path / REGIONS_FILE if path.is_dir() else path
    if not file.is_file():
        raise MedAlignError(f"--regions {path}: no {REGIONS_FILE} there (see shared/regions.py for the format)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedAlignError(f"--regions {file}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != REGIONS_FORMAT:
        raise MedAlignError(f"--regions {file}: not a {REGIONS_FORMAT} file (its 'format' key)")
    if data.get("version") != REGIONS_VERSION:
        raise MedAlignError(f"--regions {file}: version {data.get('version')!r}, this code reads {REGIONS_VERSION}")
    labels, masks = data.get("labels", {}), data.get("masks")
    if not isinstance(labels, dict) or not isinstance(masks, dict):
        raise MedAlignError(f"--regions {file}: 'labels' and 'masks' must be JSON objects")
    try:
        named = {int(k): str(v) for k, v in labels.items()}
    except ValueError:
        raise MedAlignError(f"--regions {file}: label keys must be integers, got {list(labels)}") from None
    return Regions(file.parent, named, {_norm(k): str(v) for k, v in masks.items()})


def write_regions(out_dir: str | Path, masks: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                  labels: dict[int, str], *, mask_dir: str = "masks") -> Path:
    """Write ``out_dir/regions.json`` and one PNG per image under ``out_dir/mask_dir``.

    ``masks`` maps (or yields pairs of) the image's dataset-relative path and its [H, W] integer
    labels (0..65535; 8-bit PNGs when every value fits), written one at a time. Mask files are
    named after the image path (``/`` -> ``__``). Returns the path of ``regions.json``, written last."""
    out_dir = Path(out_dir)
    (out_dir / mask_dir).mkdir(parents=True, exist_ok=True)
    entries = {}
    pairs = masks.items() if isinstance(masks, Mapping) else masks
    for rel, mask in pairs:
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.size == 0:
            raise MedAlignError(f"mask of {rel!r} must be a non-empty 2-D array, got shape {mask.shape}")
        if mask.min() < 0 or mask.max() > 65535:
            raise MedAlignError(f"mask of {rel!r} holds labels outside 0..65535")
        name = _norm(rel).replace("/", "__").rsplit(".", 1)[0] + ".png"
        arr = mask.astype(np.uint8) if mask.max() <= 255 else mask.astype(np.uint16)
        Image.fromarray(arr).save(out_dir / mask_dir / name)
        entries[_norm(rel)] = f"{mask_dir}/{name}"
    doc = {"format": REGIONS_FORMAT, "version": REGIONS_VERSION,
           "labels": {str(int(k)): str(v) for k, v in sorted(labels.items())}, "masks": entries}
    file = out_dir / REGIONS_FILE
    file.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return file


def canvas_labels(mask: np.ndarray, geometry: str = "pad") -> np.ndarray:
    """The mask on the square the student (``pad``) or a cropping expert (``crop``) resizes to the
    grid: ``pad`` centres it on a max(W, H) square filled with :data:`PADDING` at the offsets of
    :func:`shared.images.expand2square`; ``crop`` keeps the centred min(W, H) square (offsets
    rounded as torchvision's CenterCrop; the crop of the resized image, up to resampling)."""
    h, w = mask.shape
    if geometry == "pad":
        side = max(w, h)
        canvas = np.full((side, side), PADDING, dtype=np.int64)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top:top + h, left:left + w] = mask
        return canvas
    if geometry == "crop":
        side = min(w, h)
        top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
        return np.asarray(mask[top:top + side, left:left + side], dtype=np.int64)
    raise MedAlignError(f"unknown geometry {geometry!r}; choose 'pad' or 'crop'")


def patch_labels(mask: np.ndarray, grid: int, geometry: str = "pad") -> np.ndarray:
    """[G * G] int64 label of each patch (row-major, the order of the student's image tokens).

    Patch (r, c) of the G x G grid covers the canvas pixels whose centres fall in
    [r * S / G, (r + 1) * S / G) x [c * S / G, (c + 1) * S / G) (S the canvas side,
    :func:`canvas_labels`); its label is the one most of them hold (ties: the smallest label, the
    padding last). A canvas smaller than the grid gives every patch the pixel under its centre.
    """
    canvas = canvas_labels(np.asarray(mask), geometry)
    side = canvas.shape[0]
    if side < grid:
        centres = ((np.arange(grid) + 0.5) * side / grid).astype(np.int64)
        return canvas[np.ix_(centres, centres)].reshape(-1)
    cell = np.floor((np.arange(side) + 0.5) * grid / side).astype(np.int64)  # patch row/col of each pixel
    patch = (cell[:, None] * grid + cell[None, :]).reshape(-1)
    values, codes = np.unique(canvas.reshape(-1), return_inverse=True)
    counts = np.zeros((grid * grid, len(values)), dtype=np.int64)
    np.add.at(counts, (patch, codes.reshape(-1)), 1)
    # order of preference on ties: labels ascending, the padding after every label
    order = np.argsort(np.where(values == PADDING, np.iinfo(np.int64).max, values), kind="stable")
    best = order[np.argmax(counts[:, order], axis=1)]
    return values[best]


__all__ = ["REGIONS_FORMAT", "REGIONS_VERSION", "REGIONS_FILE", "PADDING", "Regions", "read_mask",
           "read_regions", "write_regions", "canvas_labels", "patch_labels"]
