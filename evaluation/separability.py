"""How well token features separate regions: a linear probe and silhouettes (scikit-learn).

* :func:`separability` ``(features [M, d], labels [M], groups [M] | None) -> dict``: the held-out
  accuracy of a logistic-regression probe (standardised features; k-fold split by ``groups``, i.e.
  by image, so no image has tokens on both sides of a split; by stratified token folds only without
  groups) next to what guessing the majority region scores, and the silhouette of the labels.
* :func:`within_image_silhouette`: the silhouette per image (tokens compared only with tokens of
  their own image), averaged over images; with ``metric="precomputed"`` it takes per-image
  distance matrices, which is all a similarity cache (``S_e``) allows for the expert.

Tokens labelled < 0 (the padding, :data:`shared.regions.PADDING`) are left out everywhere.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: The silhouette is O(M^2): above this many tokens it is computed on a seeded sample of them.
SILHOUETTE_SAMPLE = 5000


def _counts(y: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(y, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def separability(features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None, *,
                 folds: int = 5, seed: int = 0, silhouette_sample: int = SILHOUETTE_SAMPLE) -> dict[str, Any]:
    """Linear-probe accuracy and silhouette of ``labels`` on ``features``.

    Args:
        features: [M, d] token features.
        labels: [M] integer region labels; entries < 0 are dropped.
        groups: [M] image of each token; the probe's folds never split an image (GroupKFold with
            min(folds, images) folds). None: stratified token folds (tokens of one image then sit on
            both sides, which flatters the probe; say so when you report it).
        folds: at most this many folds.
        seed: the token folds' shuffle and the silhouette's sample.
    Returns:
        ``{"tokens", "classes": {label: count}, "probe_accuracy", "probe_balanced_accuracy",
        "majority_fraction", "folds", "split": "image" | "token", "silhouette"}``; with fewer than
        two regions (or fewer than two folds possible) the scores are None and ``"note"`` says why.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, silhouette_score
    from sklearn.model_selection import GroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {x.shape} and labels {y.shape} do not match")
    g = None if groups is None else np.asarray(groups).reshape(-1)
    if g is not None and g.shape[0] != y.shape[0]:
        raise ValueError(f"groups {g.shape} and labels {y.shape} do not match")
    keep = y >= 0
    x, y = x[keep], y[keep]
    g = None if g is None else g[keep]
    out: dict[str, Any] = {"tokens": int(y.size), "classes": _counts(y), "probe_accuracy": None,
                           "probe_balanced_accuracy": None, "majority_fraction": None, "folds": 0,
                           "split": "token" if g is None else "image", "silhouette": None}
    if y.size == 0 or np.unique(y).size < 2:
        out["note"] = "fewer than two regions among the tokens"
        return out
    out["majority_fraction"] = max(out["classes"].values()) / y.size
    if g is not None:
        k = min(int(folds), np.unique(g).size)
        splitter = GroupKFold(n_splits=k) if k >= 2 else None
    else:
        k = min(int(folds), min(out["classes"].values()))
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed) if k >= 2 else None
    if splitter is None:
        out["note"] = "fewer than two images (or tokens per region) to hold out: no probe score"
    else:
        pred = np.empty_like(y)
        for train, test in splitter.split(x, y, g):
            if np.unique(y[train]).size < 2:  # one region in the training folds: the probe can only say it
                pred[test] = y[train][0]
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            probe.fit(x[train], y[train])
            pred[test] = probe.predict(x[test])
        out["probe_accuracy"] = float(np.mean(pred == y))
        out["probe_balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        out["folds"] = int(k)
    if np.unique(y).size < y.size:
        sample = int(silhouette_sample) if y.size > silhouette_sample else None
        try:
            out["silhouette"] = float(silhouette_score(x, y, sample_size=sample, random_state=seed))
        except ValueError:  # the sample drew a single region
            out["silhouette"] = None
    return out


def within_image_silhouette(items: Sequence[tuple[np.ndarray, np.ndarray]], metric: str = "cosine") -> dict[str, Any]:
    """Mean over images of the silhouette of each image's tokens among themselves.

    Args:
        items: per image ``(X, labels)``: X [m, d] features, or with ``metric="precomputed"`` an
            [m, m] distance matrix; labels [m] (entries < 0 dropped).
        metric: any scikit-learn metric name, or ``"precomputed"``.
    Returns:
        ``{"silhouette": mean or None, "images": how many had two regions or more}``.
    """
    from sklearn.metrics import silhouette_score

    scores = []
    for x, y in items:
        y = np.asarray(y).astype(np.int64)
        keep = y >= 0
        x = np.asarray(x, dtype=np.float64)
        if metric == "precomputed":  # symmetric, >= 0, zero diagonal (fp16 similarities round past 1)
            x = np.clip((x + x.T) / 2.0, 0.0, None)[np.ix_(keep, keep)]
            np.fill_diagonal(x, 0.0)
        else:
            x = x[keep]
        y = y[keep]
        k = np.unique(y).size
        if k < 2 or k >= y.size:
            continue
        scores.append(float(silhouette_score(x, y, metric=metric)))
    return {"silhouette": float(np.mean(scores)) if scores else None, "images": len(scores)}


__all__ = ["SILHOUETTE_SAMPLE", "separability", "within_image_silhouette"]
