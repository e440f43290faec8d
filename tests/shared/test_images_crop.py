"""``Preprocess(geometry='crop')`` equals open_clip's own evaluation transform pixel for pixel.

The reference preprocesses every expert input with open_clip's stock transform,
``image_transform(size, is_train=False, mean, std)`` (torchvision ``Resize(size)`` + ``CenterCrop``
on a PIL image, DESIGN.md 1 "Geometry"). The tests call that transform directly and compare its
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


@pytest.fixture(scope="module")
def vqa_rad_images(vqa_rad_dir):
    paths = sorted((vqa_rad_dir / "images").iterdir())
    with ThreadPoolExecutor(4) as pool:
        return list(zip(paths, pool.map(lambda p: load_image(p)[0], paths)))


@pytest.mark.parametrize("size", [224, 336])
def test_crop_equals_open_clip_on_every_vqa_rad_image(vqa_rad_images, size):
    assert len(vqa_rad_images) == 315
    assert any(img.size[0] != img.size[1] for _, img in vqa_rad_images)
    ours, theirs = _pair(size)
    with ThreadPoolExecutor(4) as pool:  # PIL resizes release the GIL
        diffs = list(pool.map(lambda item: _max_diff(ours, theirs, item[1]), vqa_rad_images))
    worst = int(np.argmax(diffs))
    assert diffs[worst] <= 1e-6, f"{vqa_rad_images[worst][0].name}: max abs diff {diffs[worst]}"
