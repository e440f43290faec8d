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
    _save(fig, axes, out)
    return patch


def plot_a3_entry(cache: Path, data: Path, image_root: Path, out: Path, question: str | None = None) -> tuple[str, int]:
    """The question's image in the student's view (pad) or the authors' stretched view, its top-k masks on the
    G x G grid over it, the question and the scores as the title; returns (question key, masks shown)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.a3_queries import query_sha256, query_text, question_key
    from shared.cache.a3tune import open_a3_cache
    from shared.images import expand2square, resolve_image_path
    from shared.records import load_records, question_text, record_image

    reader = open_a3_cache(cache)
    m = reader.manifest
    records = {question_key(r): r for r in load_records(data) if record_image(r) is not None and "id" in r}
    keys = [question] if question is not None else [k for k in records if (e := reader.entry(k)) is not None
                                                    and len(e.labels)][:1]
    if not keys or keys[0] not in records:
        raise MedAlignError(f"--question {question!r} is not in {data}" if question is not None else
                            f"no question of {data} has labels in {cache}")
    key = keys[0]
    entry = reader.entry(key)
    if entry is None:
        raise MedAlignError(f"question {key!r} is not in the cache {cache}")
    rec = records[key]
    img, img_key = load_image(resolve_image_path(image_root, record_image(rec)))
    if img_key != entry.image_key:
        raise MedAlignError(f"{record_image(rec)}: not the image the cache holds for question {key!r} (file changed?)")
    view = expand2square(img, tuple(m.background)) if m.geometry == "pad" else img
    view = view.resize((m.view_size, m.view_size))
    g, side = m.grid, m.view_size
    fig, ax = plt.subplots(figsize=(6, 6.6))
    ax.imshow(view)
    colours = plt.get_cmap("tab10")
    for j, label in enumerate(entry.labels):
        rgba = np.zeros((g, g, 4))
        rgba[..., :3] = colours(j % 10)[:3]
        rgba[..., 3] = 0.45 * label.reshape(g, g)
        ax.imshow(rgba, extent=(0, side, side, 0), interpolation="nearest")
    stale = "" if entry.query_sha256 == query_sha256(query_text(rec, m.template)) else " [query text changed]"
    scores = ", ".join(f"{s:.3f}" for s in entry.scores)
    ax.set_title(f"{question_text(rec)[:70]}\nq {key}: top-{len(entry.labels)} masks ({scores}){stale}", fontsize=9)
    _save(fig, [ax], out)
    return key, len(entry.labels)


def _save(fig, axes, out: Path) -> None:
    """Both figures' finish: no ticks, tight layout, written to ``out`` (its folder made), closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
