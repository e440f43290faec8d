"""evaluation.separability on constructions whose answer is known, and the silhouette by hand.

* separable blobs: probe ~1, silhouette high; random labels: probe at the majority share, silhouette ~0;
* the probe's folds are split by image: features that only identify the image, with one region per
  image, are perfectly "separable" across token folds and at chance across image folds;
* the silhouette equals the textbook formula computed with loops here (a(i), b(i) per token).
"""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.separability import separability, within_image_silhouette
from evaluation.tsne import separability as reexported


def blobs(n_per: int, k: int, d: int, gap: float, rng) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(k, d)) * gap
    y = np.repeat(np.arange(k), n_per)
    return centres[y] + rng.normal(size=(y.size, d)), y


def test_reexported_from_tsne():
    assert reexported is separability


def test_separable_vs_random():
    rng = np.random.default_rng(0)
    x, y = blobs(60, 3, 8, 10.0, rng)
    groups = np.tile(np.arange(20), 9)  # 20 "images", every region in each
    good = separability(x, y, groups)
    assert good["probe_accuracy"] > 0.98 and good["probe_balanced_accuracy"] > 0.98
    assert good["silhouette"] > 0.6 and good["split"] == "image" and good["folds"] == 5
    noise = separability(rng.normal(size=x.shape), y, groups)
    assert abs(noise["probe_accuracy"] - 1 / 3) < 0.12
    assert abs(noise["silhouette"]) < 0.05
    assert good["classes"] == {"0": 60, "1": 60, "2": 60} and good["tokens"] == 180


def test_imbalanced_chance_is_the_majority_share():
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.1).astype(int)  # 10 % lesion
    s = separability(rng.normal(size=(400, 5)), y, np.arange(400) % 10)
    assert s["majority_fraction"] == pytest.approx(1 - y.mean())
    assert s["probe_balanced_accuracy"] < 0.6  # no better than chance on the minority


def test_split_by_image_not_by_token():
    """Each image has one region and its own random offset; the features say nothing else."""
    rng = np.random.default_rng(2)
    images, per = 12, 30
    offsets = rng.normal(size=(images, 6)) * 5
    g = np.repeat(np.arange(images), per)
    y = g % 2  # region = parity of the image
    x = offsets[g] + 0.1 * rng.normal(size=(g.size, 6))
    by_token = separability(x, y, None)
    by_image = separability(x, y, g)
    assert by_token["split"] == "token" and by_token["probe_accuracy"] > 0.95  # the leak
    assert by_image["probe_accuracy"] < 0.8  # held-out images: no more than luck on 12 images


def test_padding_dropped_and_degenerate_cases():
    rng = np.random.default_rng(3)
    x, y = blobs(10, 2, 3, 10.0, rng)
    y2 = y.copy()
    y2[:5] = -1
    s = separability(x, y2, np.arange(20) % 4)
    assert s["tokens"] == 15 and "-1" not in s["classes"]
    one = separability(x, np.zeros(20, dtype=int), np.arange(20) % 4)
    assert one["probe_accuracy"] is None and one["silhouette"] is None and "note" in one
    single_image = separability(x, y, np.zeros(20, dtype=int))
    assert single_image["probe_accuracy"] is None and single_image["silhouette"] is not None


def loop_silhouette(x: np.ndarray, y: np.ndarray, dist) -> float:
    vals = []
    for i in range(len(y)):
        same = [dist(x[i], x[j]) for j in range(len(y)) if j != i and y[j] == y[i]]
        if not same:
            vals.append(0.0)
            continue
        a = sum(same) / len(same)
        b = min(np.mean([dist(x[i], x[j]) for j in range(len(y)) if y[j] == c]) for c in set(y.tolist()) if c != y[i])
        vals.append((b - a) / max(a, b))
    return float(np.mean(vals))


def test_silhouette_by_hand():
    rng = np.random.default_rng(4)
    x, y = blobs(7, 3, 4, 1.5, rng)
    euclid = lambda a, b: float(np.sqrt(((a - b) ** 2).sum()))  # noqa: E731
    assert separability(x, y)["silhouette"] == pytest.approx(loop_silhouette(x, y, euclid), abs=1e-9)
    cosine = lambda a, b: 1.0 - float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    x2, y2 = blobs(5, 2, 4, 2.0, rng)
    items = [(x, y), (x2, y2), (x2[:3], np.zeros(3, dtype=int))]  # the last has one region: not counted
    got = within_image_silhouette(items, "cosine")
    assert got["images"] == 2
    assert got["silhouette"] == pytest.approx((loop_silhouette(x, y, cosine) + loop_silhouette(x2, y2, cosine)) / 2)
    d = np.array([[cosine(a, b) for b in x] for a in x])
    pre = within_image_silhouette([(d, y)], "precomputed")
    assert pre["silhouette"] == pytest.approx(loop_silhouette(x, y, cosine), abs=1e-6)
