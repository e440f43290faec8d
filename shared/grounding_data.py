"""The grounding data set: generated "scans" where the answer depends on where the lesion is.

Each image (``IMAGE_SIZE`` px square, grey, saved as PNG) has a textured background (smoothed
noise plus fine noise), one **lesion** (a bright filled disc, entirely inside one quadrant) and
**distractors** at random places: dark discs ("cysts") and thin bright lines ("vessels"), which
may lie in any quadrant, so neither "is something bright on the left" nor the mean grey level of a
half tells where the lesion is without telling the lesion from the vessels.

Questions per image (all three are asked of every image; the answers are balanced by design):

* ``Is the lesion in the left half?`` -> yes / no
* ``Is the lesion in the upper half?`` -> yes / no
* ``Which quadrant holds the lesion?`` -> upper left / upper right / lower left / lower right

The lesion's pixel mask is saved per image (``masks/NAME.png``, 0/255) and its patch mask on the
student's ``G x G`` grid (``grid_masks.json``: image -> list of N = G*G 0/1 flags, row-major; a
patch counts when the lesion covers at least ``PATCH_COVER`` of its pixels). Splits: ``train``
(small, so that the language loss alone does not solve it), ``val`` (carved from the same
distribution, for any tuning) and ``test`` (held out; >= 1,000 questions by default). The same
lesion masks are also written as a ``medalign-regions`` folder (``regions/regions.json`` and
``regions/masks/NAME.png``, labels 0 background / 1 lesion, :func:`write_lesion_regions`), the
``--regions`` of ``medalign-eval tsne`` (``masks/`` holds 0/255, which that format would read as
label 255). Everything is a function of ``seed``: two calls write identical files.

It lives in ``shared`` because both ``bench/grounding.py`` and ``medalign-eval demo`` use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 48
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
#: Fraction of a patch's pixels the lesion must cover for the patch to be a lesion patch.
PATCH_COVER = 0.25
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
QUESTIONS = {
    "left": "Is the lesion in the left half?",
    "upper": "Is the lesion in the upper half?",
    "quadrant": "Which quadrant holds the lesion?",
}
#: The folder (under the data root) of the lesion masks in the ``medalign-regions`` format.
REGIONS_DIR = "regions"
#: Default split sizes in images (3 questions each): the test split holds 1,200 questions.
SPLITS = {"train": 96, "val": 32, "test": 400}


@dataclass(frozen=True)
class Scan:
    """One generated image and where its lesion is."""

    image: str
    """File name under ``images/``."""
    quadrant: str
    """One of :data:`QUADRANTS`."""
    center: tuple[float, float]
    """Lesion centre (x, y) in pixels."""
    radius: float
    pixel_mask: np.ndarray
    """[IMAGE_SIZE, IMAGE_SIZE] bool, the lesion's pixels."""

    @property
    def grid_mask(self) -> np.ndarray:
        return grid_mask(self.pixel_mask)


def grid_mask(pixel_mask: np.ndarray, patch: int = PATCH_SIZE, cover: float = PATCH_COVER) -> np.ndarray:
    """[H, W] bool pixel mask -> [G*G] bool patch flags (row-major), a patch set when the mask covers
    at least ``cover`` of its pixels."""
    h, w = pixel_mask.shape
    frac = pixel_mask.reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3))
    return (frac >= cover).reshape(-1)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture: a ``cells x cells`` Gaussian field upsampled bilinearly to ``size``."""
    coarse = rng.standard_normal((cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def draw_scan(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, dict]:
    """One image ([size, size] uint8) and its lesion: ``{"quadrant", "center", "radius", "mask"}``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    img = 85 + 14 * _smooth_noise(rng, size, 4) + 6 * rng.standard_normal((size, size))
    half = size / 2
    # distractors first, so the lesion is drawn on top of them
    for _ in range(int(rng.integers(1, 3))):  # dark discs
        cx, cy, r = rng.uniform(4, size - 4), rng.uniform(4, size - 4), rng.uniform(3, 6)
        img = np.where((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r, img - 45, img)
    for _ in range(int(rng.integers(1, 3))):  # thin bright lines
        x0, y0 = rng.uniform(0, size, 2)
        ang = rng.uniform(0, np.pi)
        dist = np.abs((xx - x0) * np.sin(ang) - (yy - y0) * np.cos(ang))
        img = np.where(dist <= 0.6, img + 90, img)
    quadrant = QUADRANTS[int(rng.integers(0, 4))]
    r = rng.uniform(5.0, 8.0)
    left, upper = quadrant.endswith("left"), quadrant.startswith("upper")
    lo, hi = r + 1, half - r - 1  # the whole disc inside its quadrant
    cx = rng.uniform(lo, hi) + (0 if left else half)
    cy = rng.uniform(lo, hi) + (0 if upper else half)
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    img = np.where(mask, 215 + 10 * rng.standard_normal((size, size)), img)
    return np.clip(img, 0, 255).astype(np.uint8), {"quadrant": quadrant, "center": (float(cx), float(cy)),
                                                   "radius": float(r), "mask": mask}


def answers(quadrant: str) -> dict[str, str]:
    """The answer to each of :data:`QUESTIONS` for a lesion in ``quadrant``."""
    return {"left": "yes" if quadrant.endswith("left") else "no",
            "upper": "yes" if quadrant.startswith("upper") else "no",
            "quadrant": quadrant}


def make_scans(root: str | Path, count: int, seed: int, prefix: str) -> list[Scan]:
    """Write ``count`` scans (``images/PREFIX_iiii.png`` and ``masks/...``) under ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    scans = []
    for i in range(count):
        arr, info = draw_scan(rng)
        name = f"{prefix}_{i:04d}.png"
        Image.fromarray(arr, "L").save(root / "images" / name)
        Image.fromarray(info["mask"].astype(np.uint8) * 255, "L").save(root / "masks" / name)
        scans.append(Scan(name, info["quadrant"], info["center"], info["radius"], info["mask"]))
    return scans


def records(scans: list[Scan], start_id: int) -> list[dict]:
    """LLaVA-style records, three per scan (ids from ``start_id``); each also names its ``kind``."""
    out = []
    for s in scans:
        for kind, answer in answers(s.quadrant).items():
            out.append({"id": start_id + len(out), "image": s.image, "kind": kind,
                        "answer_type": "OPEN" if kind == "quadrant" else "CLOSED",
                        "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[kind]}"},
                                          {"from": "gpt", "value": answer}]})
    return out


def write_lesion_regions(root: str | Path) -> Path:
    """``root/regions/`` (:data:`REGIONS_DIR`): every ``masks/NAME.png`` under ``root`` as a
    ``medalign-regions`` mask (:func:`shared.regions.write_regions`: 0 background, 1 lesion, the
    image's size) keyed by ``NAME.png``, the image path the records use. Returns ``regions.json``."""
    from shared.regions import write_regions

    root = Path(root)
    names = sorted(p.name for p in (root / "masks").glob("*.png"))

    def masks():
        for name in names:
            with Image.open(root / "masks" / name) as img:
                yield name, (np.asarray(img) > 127).astype(np.uint8)

    return write_regions(root / REGIONS_DIR, masks(), {0: "background", 1: "lesion"})


def make_grounding_dataset(root: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """``images/``, ``masks/``, ``{train,val,test}.json``, ``grid_masks.json`` and ``regions/``
    (:func:`write_lesion_regions`) under ``root``.

    Returns the paths (keys ``root``, ``images``, ``masks``, ``grid_masks``, ``regions`` (the
    ``regions.json`` file) and one per split).
    Each split draws from its own seed (``seed * 1000 + k``), so the test split does not change
    when the train split's size does.
    """
    sizes = dict(SPLITS if sizes is None else sizes)
    root = Path(root)
    paths: dict[str, Path] = {"root": root, "images": root / "images", "masks": root / "masks",
                              "grid_masks": root / "grid_masks.json"}
    grids: dict[str, list[int]] = {}
    for k, (split, count) in enumerate(sizes.items()):
        scans = make_scans(root, count, seed * 1000 + k, split)
        recs = records(scans, start_id=100_000 * (k + 1))
        paths[split] = root / f"{split}.json"
        paths[split].write_text(json.dumps(recs, indent=1))
        grids.update({s.image: [int(v) for v in s.grid_mask] for s in scans})
    paths["grid_masks"].write_text(json.dumps({"grid": GRID, "patch_cover": PATCH_COVER, "masks": grids}))
    paths["regions"] = write_lesion_regions(root)
    return paths


def load_grid_masks(path: str | Path) -> dict[str, np.ndarray]:
    """``grid_masks.json`` -> image name -> [N] bool patch flags."""
    doc = json.loads(Path(path).read_text())
    return {k: np.asarray(v, dtype=bool) for k, v in doc["masks"].items()}


__all__ = ["GRID", "IMAGE_SIZE", "PATCH_SIZE", "PATCH_COVER", "QUADRANTS", "QUESTIONS", "REGIONS_DIR", "SPLITS",
           "Scan", "answers", "draw_scan", "grid_mask", "load_grid_masks", "make_grounding_dataset", "make_scans", "records",
           "write_lesion_regions"]
