"""Grid maths shared by the teacher and the student: packed triangles and the student's grid."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from shared.errors import MedAlignError
from shared.records import read_json


#: How the expert's patch features are resampled to the student grid when the grids differ
#: (docs/design.md 1, "Resampling"): ``norm-resample-norm`` L2-normalises each token, resamples, and
#: L2-normalises each row again (the reference's UniMed-B notebook; the default); ``resample-norm``
#: resamples the raw tokens and normalises once (the reference's BiomedCLIP notebook, and what caches
#: written before the setting existed hold).
RESAMPLE_ORDERS = ("norm-resample-norm", "resample-norm")
DEFAULT_RESAMPLE_ORDER = "norm-resample-norm"
#: The order of a cache whose manifest predates the ``resample_order`` key.
LEGACY_RESAMPLE_ORDER = "resample-norm"


def check_resample_order(order: str, what: str = "resample order") -> str:
    """``order`` itself if it is one of :data:`RESAMPLE_ORDERS`, else a :class:`MedAlignError`."""
    if order not in RESAMPLE_ORDERS:
        raise MedAlignError(f"unknown {what} {order!r}; choose one of {', '.join(RESAMPLE_ORDERS)}")
    return order


def triangle_size(n: int) -> int:
    """Number of entries in the upper triangle of an n x n matrix, diagonal included."""
    return n * (n + 1) // 2


def side_from_triangle(t: int) -> int:
    n = (math.isqrt(8 * t + 1) - 1) // 2
    if triangle_size(n) != t:
        raise ValueError(f"{t} is not a triangular number")
    return n


@lru_cache(maxsize=8)
def _triu(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n)


def pack_triangle(mat: np.ndarray) -> np.ndarray:
    """Upper triangle incl. diagonal of a symmetric (n, n) matrix, in ``np.triu_indices(n)`` order."""
    n = mat.shape[-1]
    i, j = _triu(n)
    return mat[..., i, j]


@lru_cache(maxsize=4)
def _unpack_index(n: int) -> np.ndarray:
    """(n, n) positions into the packed triangle: entry (i, j) and (j, i) both point at tri[k]."""
    i, j = _triu(n)
    idx = np.empty((n, n), dtype=np.intp)
    k = np.arange(i.size)
    idx[i, j] = k
    idx[j, i] = k
    return idx


def unpack_triangle(tri: np.ndarray, out_dtype=np.float32) -> np.ndarray:
    """Rebuild the full symmetric (n, n) matrix from its packed upper triangle (one 1-D row)."""
    n = side_from_triangle(tri.shape[-1])
    return tri.astype(out_dtype, copy=False)[_unpack_index(n)]  # one gather: ~4x faster than two scatters


def grid_side(num_tokens: int) -> int:
    g = math.isqrt(num_tokens)
    if g * g != num_tokens:
        raise MedAlignError(f"{num_tokens} image tokens is not a square grid")
    return g


def student_grid(model_dir: str | Path) -> int:
    """The student's visual token grid side G, read from an HF-format LLaVA ``config.json``.

    G = vision_config.image_size // vision_config.patch_size (576 tokens = 24 x 24 for CLIP
    ViT-L/14 at 336). Raises a clear error for a directory that is not a LLaVA model.
    """
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise MedAlignError(f"{model_dir}: no config.json; expected an HF-format LLaVA model directory")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        cfg = {}
    vision = cfg.get("vision_config")
    if not isinstance(vision, dict) or "image_size" not in vision or "patch_size" not in vision:
        raise MedAlignError(
            f"{cfg_path}: not a LLaVA config (model_type={cfg.get('model_type')!r}); need "
            "vision_config.image_size and vision_config.patch_size")
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    if size % patch:
        raise MedAlignError(f"{cfg_path}: image_size {size} is not a multiple of patch_size {patch}")
    return size // patch
