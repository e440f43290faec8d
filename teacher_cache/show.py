"""``medalign-cache show``: E_a over the image beside one patch's similarity row."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.cache import open_cache
from shared.errors import MedAlignError
from shared.images import Preprocess, load_image


def plot_entry(cache: Path, image: Path, out: Path, patch: int | None = None) -> int:
    """Write the figure; returns the patch whose similarity row is shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reader = open_cache(cache)
    m = reader.manifest
    img, key = load_image(image)
    row = reader.row_of_key(key)
    if row is None:
        raise MedAlignError(f"{image} is not in the cache {cache} (looked up by the sha256 of its bytes)")
    sim, attn = reader.read(row)
    g = m.grid
    if patch is None:
        patch = int(np.argmax(attn))
    if not 0 <= patch < g * g:
        raise MedAlignError(f"--patch must be in 0..{g * g - 1}")
    pp = m.preprocessing
    view = Preprocess(int(pp["image_size"]) or 336, tuple(pp["mean"]), tuple(pp["std"]), m.geometry).to_pil(img)
    side = view.size[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    axes[0].imshow(view)
    axes[0].imshow(attn.reshape(g, g), cmap="jet", alpha=0.45, extent=(0, side, side, 0), interpolation="bilinear")
    axes[0].set_title(f"E_a (CLS attention, {m.expert}, {m.geometry})")
    pr, pc = divmod(patch, g)
    cell = side / g
    axes[0].add_patch(plt.Rectangle((pc * cell, pr * cell), cell, cell, fill=False, edgecolor="white", lw=2))
    im = axes[1].imshow(sim[patch].reshape(g, g), cmap="viridis", vmin=-1, vmax=1)
    axes[1].set_title(f"S_e row of patch {patch} (row {pr}, col {pc})")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return patch
