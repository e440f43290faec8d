"""``Preprocess(geometry='crop')`` equals open_clip's own evaluation transform pixel for pixel.

The reference preprocesses every expert input with open_clip's stock transform,
``image_transform(size, is_train=False, mean, std)`` (torchvision ``Resize(size)`` + ``CenterCrop``
on a PIL image, docs/design.md 1 "Geometry"). The tests call that transform directly and compare its
normalised tensor with ours; both sides get the same RGB PIL image from ``shared.images``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from open_clip.transform import image_transform
from PIL import Image

from shared.images import Preprocess, load_image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _pair(size: int):
    ours = Preprocess(image_size=size, mean=OPENAI_MEAN, std=OPENAI_STD, geometry="crop")
    theirs = image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    return ours, theirs


def _max_diff(ours, theirs, img: Image.Image) -> float:
    a = ours(img)
    b = theirs(img).numpy()
    assert a.shape == b.shape == (3, ours.image_size, ours.image_size)
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("size", [224, 336])
@pytest.mark.parametrize("wh", [(986, 1200), (1200, 986), (1024, 1089), (2321, 1384), (500, 500),
                                (224, 301), (301, 336), (150, 97), (337, 1000)])
def test_crop_equals_open_clip_eval_transform_synthetic(size, wh):
    """Random noise images, portrait and landscape, down- and up-scaled. (986, 1200) at 224 failed with
    the old rounding: the long side became round(272.6) = 273 rows instead of torchvision's 272."""
    rng = np.random.default_rng(wh[0] * 7 + wh[1])
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8), mode="RGB")
    ours, theirs = _pair(size)
    assert _max_diff(ours, theirs, img) <= 1e-6
    # and the 8-bit image itself, before ToTensor + Normalize
    ref_pil = img
    for t in theirs.transforms[:2]:  # Resize(size), CenterCrop(size)
        ref_pil = t(ref_pil)
    np.testing.assert_array_equal(np.asarray(ours.to_pil(img)), np.asarray(ref_pil))


def _load_all(folder):
    paths = sorted(folder.iterdir())
    with ThreadPoolExecutor(4) as pool:
        return list(zip(paths, pool.map(lambda p: load_image(p)[0], paths)))


def _check_all(images, size):
    ours, theirs = _pair(size)
    with ThreadPoolExecutor(4) as pool:  # PIL resizes release the GIL
        diffs = list(pool.map(lambda item: _max_diff(ours, theirs, item[1]), images))
    worst = int(np.argmax(diffs))
    assert diffs[worst] <= 1e-6, f"{images[worst][0].name}: max abs diff {diffs[worst]}"


@pytest.fixture(scope="module")
def vqa_rad_images(vqa_rad_dir):
    return _load_all(vqa_rad_dir / "images")


@pytest.mark.slow  # all 315 images (~5 s); the committed 12-image variant runs in the fast suite
@pytest.mark.parametrize("size", [224, 336])
def test_crop_equals_open_clip_on_every_vqa_rad_image(vqa_rad_images, size):
    """All 315 images of the full copy (development workspace only)."""
    assert len(vqa_rad_images) == 315
    assert any(img.size[0] != img.size[1] for _, img in vqa_rad_images)
    _check_all(vqa_rad_images, size)


@pytest.mark.parametrize("size", [224, 336])
def test_crop_equals_open_clip_on_the_committed_vqa_rad_images(vqa_rad_subset_dir, size):
    """The 12 committed real JPEGs (tests/assets): the tallest, widest, largest and smallest of
    the set and synpic21776 (986 x 1200, the size the old rounding got wrong at 224)."""
    images = _load_all(vqa_rad_subset_dir / "images")
    assert len(images) == 12
    sizes = {p.name: img.size for p, img in images}
    assert sizes["synpic21776.jpg"] == (986, 1200) and sizes["synpic100132.jpg"] == (2321, 1384)
    assert sum(w != h for w, h in sizes.values()) == 10
    _check_all(images, size)
