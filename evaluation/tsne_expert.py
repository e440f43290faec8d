"""The expert's panel of ``medalign-eval tsne`` (paper Fig. 1b), from what a MedAlign cache holds.

The teacher cache stores, per image, ``S_e`` (the N x N cosine similarities of the expert's patch
features on the student's grid) and ``E_a``, not the features themselves. Cosine distances
``1 - S_e`` are therefore known between tokens of the SAME image only, never across images, so a
pooled embedding of all images (what the student's panels show) cannot be made. What is drawn
instead: t-SNE on the precomputed ``1 - S_e`` of one image (the one whose sampled tokens cover the
most regions), and what is scored: the silhouette of the regions within each image from ``1 - S_e``,
averaged over images, on the same patches the student panels use; the student's own
``within_image_silhouette_cosine`` per layer is the number to compare it with. No probe accuracy
for the expert (no features to fit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evaluation.separability import within_image_silhouette
from shared.cache import open_cache
from shared.errors import MedAlignError
from shared.regions import Regions, patch_labels

NOTE = ("the cache holds S_e (similarities), not features: t-SNE on 1 - S_e of one image, silhouette within "
        "each image from 1 - S_e (compare with the layers' within_image_silhouette_cosine); no probe")


def open_expert(path: str | Path):
    """The cache reader (a :class:`MedAlignError` for a missing or unreadable cache)."""
    return open_cache(path)


def expert_panel(reader, tokens, image_root: str | Path, num_image_tokens: int, regions: Regions, *,
                 perplexity: float = 30.0, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(JSON entry, figure panel or None)`` for the expert of ``reader`` on ``tokens``' patches.

    Patches are relabelled in the cache's own geometry when it is not the student's ``pad``.
    """
    from evaluation.tsne_plot import clipped_perplexity, embed

    m = reader.manifest
    entry: dict[str, Any] = {"source": "S_e", "expert": m.expert, "cache": str(reader.path),
                             "geometry": m.geometry, "within_image_silhouette": None, "images": 0,
                             "panel_image": None, "note": NOTE}
    if m.num_tokens != num_image_tokens:
        entry["note"] = (f"cache grid {m.grid}x{m.grid} is not the student's ({num_image_tokens} tokens): "
                         "no expert panel")
        return entry, None
    if m.geometry not in ("pad", "crop"):
        raise MedAlignError(f"--expert-cache {reader.path}: unknown geometry {m.geometry!r}")
    grid = m.grid
    items, names, missing = [], [], 0
    for i, image in enumerate(tokens.images):
        got = reader.get(image, image_root)
        if got is None:
            missing += 1
            continue
        sim = got[0]
        sel = tokens.groups == i
        idx = tokens.patches[sel]
        lab = tokens.labels[sel] if m.geometry == "pad" else patch_labels(regions.mask(image), grid, m.geometry)[idx]
        items.append((1.0 - sim[np.ix_(idx, idx)], lab))
        names.append(image)
    entry["images_not_in_cache"] = missing
    score = within_image_silhouette(items, "precomputed")
    entry["within_image_silhouette"], entry["images"] = score["silhouette"], score["images"]
    usable = [(len(np.unique(lab[lab >= 0])), -k) for k, (_, lab) in enumerate(items) if (lab >= 0).sum() >= 4]
    if not usable:
        return entry, None
    k = -max(usable)[1]
    d, lab = items[k]
    keep = lab >= 0
    d, lab = d[np.ix_(keep, keep)], lab[keep]
    entry["panel_image"] = names[k]
    entry["perplexity"] = clipped_perplexity(perplexity, lab.size)
    sil = entry["within_image_silhouette"]
    title = f"expert {m.expert}: 1 - S_e of {Path(names[k]).name}"
    if sil is not None:
        title += f"\nwithin-image silhouette {sil:.2f} ({entry['images']} images)"
    panel = {"title": title, "xy": embed(d, perplexity, seed, precomputed=True), "labels": lab,
             "probe": None, "silhouette": None}
    return entry, panel


__all__ = ["NOTE", "open_expert", "expert_panel"]
