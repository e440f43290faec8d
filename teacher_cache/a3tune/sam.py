"""A3Tune's weak masks: SAM's automatic mask generator with the authors' settings and filter.

The authors (``Segment/sam.py`` ``hyper_params_tuning`` and the ``seg_data_*.ipynb`` notebooks) run
segment-anything's ``SamAutomaticMaskGenerator`` on a 256 x 256 image, keep the masks with area
< 40,000 px, then drop every mask whose XYWH box touches the top or left edge (x or y == 0), is
at most 12 px wide or high, or reaches past 253 px (x + w or y + h > 253). This module runs the
same generator (segment-anything is the path the authors ran; the model is built from sizes
read off the state dict and loaded with ``torch.load(weights_only=True)``) and the same filter.
tests/teacher_cache/test_a3_sam_transformers.py pins the result against an independent path on
the tiny model: transformers' ``SamModel`` (the ``.pth`` converted to its layout) under a mask
generator written out in the test; masks and boxes are identical, scores within 1e-5.

One crash of the original is guarded: with a crop layer, an image on which no mask survives
fails inside the generator's crop de-duplication (``box_area`` of an empty 1-d tensor). The
authors' later notebooks wrap the call in ``try: ... except: continue`` (the question then gets
no masks); here such an image yields ``[]``, any other error still raises.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import MedAlignError
from shared.images import sha256_file
from teacher_cache.a3tune.sam_arch import SamArch, build_sam, infer_arch

#: the SAM input view is always this square (the authors' cv2.resize(image, (256, 256)))
VIEW_SIZE = 256


@dataclass(frozen=True)
class SamSettings:
    """The automatic mask generator's settings and the authors' mask filter (defaults: theirs)."""

    points_per_side: int = 8
    """grid of point prompts per side on the whole image"""
    points_per_batch: int = 128
    """point prompts run through the mask decoder at once (memory only, not results)"""
    pred_iou_thresh: float = 0.5
    """keep masks whose predicted IoU is above this"""
    stability_score_thresh: float = 0.5
    """keep masks whose stability score is at least this"""
    box_nms_thresh: float = 0.8
    """box IoU for non-maximum suppression within one crop"""
    crop_n_layers: int = 1
    """extra layers of crops (layer i: 2**i x 2**i crops); 0 = the whole image only"""
    crop_n_points_downscale_factor: int = 2
    """points per side on crop layer i: points_per_side / factor**i"""
    crop_nms_thresh: float = 0.8
    """box IoU for non-maximum suppression between crops"""
    min_mask_region_area: int = 200
    """holes, then islands, smaller than this many pixels are removed (0: off)"""
    max_area: int = 40_000
    """the authors' filter: keep masks with area < max_area (then their edge and size rules)"""

    def __post_init__(self):
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise MedAlignError("SAM settings: points_per_side and points_per_batch must be >= 1")
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1:
            raise MedAlignError("SAM settings: crop_n_layers >= 0 and crop_n_points_downscale_factor >= 1")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "SamSettings":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise MedAlignError(f"SAM settings: unknown keys {sorted(unknown)}")
        return cls(**d)


#: cheap settings for tests and smoke runs: a 4 x 4 grid on the whole image, no crop layer
FAST_SAM_SETTINGS = SamSettings(points_per_side=4, crop_n_layers=0)


@dataclass
class WeakMask:
    """One mask kept by the filter, on the 256 x 256 SAM input view."""

    segmentation: np.ndarray
    """[H, W] bool"""
    bbox: tuple[int, int, int, int]
    """x, y, w, h: SAM's XYWH box (w = x_max - x_min of the mask's pixels, as SAM computes it)"""
    area: int
    predicted_iou: float
    stability_score: float


@dataclass
class LoadedSam:
    """A SAM model loaded from an original ``.pth``, with its provenance."""

    model: Any
    """segment-anything ``Sam`` module, eval mode, on ``device``"""
    spec: SamArch
    path: Path
    sha256: str
    device: str

    @property
    def arch(self) -> str:
        return self.spec.name

    def to_json(self) -> dict:
        return {"format": "segment-anything-pth", "file": self.path.name, "sha256": self.sha256,
                "arch": self.arch, "sizes": self.spec.to_json()}


def _read_state_dict(path: Path) -> dict:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e) and "zipfile" not in str(e).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MedAlignError(f"--sam: file not found: {path}") from None
    except IsADirectoryError:
        raise MedAlignError(f"--sam: {path} is a directory; pass the original .pth file") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        first = str(e).splitlines()[0] if str(e) else ""
        raise MedAlignError(f"--sam {path}: cannot read as a torch checkpoint with weights_only=True "
                            f"({type(e).__name__}: {first})") from None


def load_sam(path: Path, device: str = "cpu") -> LoadedSam:
    """Load SAM from the original flat ``.pth`` (ViT-H/L/B or any size, read from the shapes)."""
    path = Path(path)
    state = _read_state_dict(path)
    spec = infer_arch(state, f"--sam {path}")
    model = build_sam(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise MedAlignError(f"--sam {path}: tensors do not fit SAM {spec.name} ({first})") from None
    model.to(device)
    return LoadedSam(model=model, spec=spec, path=path, sha256=sha256_file(path), device=str(device))


def _generator_class():
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.utils.amg import MaskData

    class GuardedGenerator(SamAutomaticMaskGenerator):
        """The stock generator; an image where no crop keeps a mask returns no masks instead of
        crashing in the between-crop NMS."""

        def _process_crop(self, *args, **kwargs):
            data = super()._process_crop(*args, **kwargs)
            self._kept += len(data["rles"])
            return data

        def _generate_masks(self, image):
            self._kept = 0
            try:
                return super()._generate_masks(image)
            except (IndexError, RuntimeError):
                if self._kept:
                    raise
                return MaskData(rles=[])

    return GuardedGenerator


def mask_generator(sam: LoadedSam, settings: SamSettings, guarded: bool = True):
    """segment-anything's automatic mask generator for ``sam`` with ``settings`` (binary masks).
    ``guarded=False`` gives the stock class (the tests show it crashing where ours returns [])."""
    if guarded:
        cls = _generator_class()
    else:
        from segment_anything import SamAutomaticMaskGenerator as cls
    return cls(
        sam.model, points_per_side=settings.points_per_side, points_per_batch=settings.points_per_batch,
        pred_iou_thresh=settings.pred_iou_thresh, stability_score_thresh=settings.stability_score_thresh,
        box_nms_thresh=settings.box_nms_thresh, crop_n_layers=settings.crop_n_layers,
        crop_nms_thresh=settings.crop_nms_thresh,
        crop_n_points_downscale_factor=settings.crop_n_points_downscale_factor,
        min_mask_region_area=settings.min_mask_region_area, output_mode="binary_mask")


def keep_mask(bbox, area: int, settings: SamSettings) -> bool:
    """The authors' filter on one generator record (area, then ``filter_sam_results``)."""
    x, y, w, h = bbox
    if not area < settings.max_area:
        return False
    if x == 0 or y == 0:  # touches the top or left edge
        return False
    if w <= 12 or h <= 12:
        return False
    return not (y + h > 253 or x + w > 253)


def filter_records(records: list[dict], settings: SamSettings) -> list[WeakMask]:
    """Generator records (segment-anything's dicts) -> the kept :class:`WeakMask` list, in order."""
    kept = []
    for r in records:
        bbox = tuple(int(v) for v in r["bbox"])
        if keep_mask(bbox, int(r["area"]), settings):
            kept.append(WeakMask(segmentation=np.asarray(r["segmentation"], dtype=bool), bbox=bbox,
                                 area=int(r["area"]), predicted_iou=float(r["predicted_iou"]),
                                 stability_score=float(r["stability_score"])))
    return kept


def check_view(view: np.ndarray) -> np.ndarray:
    if not (isinstance(view, np.ndarray) and view.dtype == np.uint8 and view.shape == (VIEW_SIZE, VIEW_SIZE, 3)):
        got = getattr(view, "shape", type(view)), getattr(view, "dtype", None)
        raise ValueError(f"SAM view must be a [{VIEW_SIZE}, {VIEW_SIZE}, 3] uint8 array, got {got}")
    return np.ascontiguousarray(view)


def generate_masks(sam: LoadedSam, view: np.ndarray, settings: SamSettings = SamSettings()) -> list[WeakMask]:
    """The filtered masks of one 256 x 256 x 3 uint8 view, in the generator's order; [] if none."""
    records = mask_generator(sam, settings).generate(check_view(view))
    return filter_records(records, settings)
