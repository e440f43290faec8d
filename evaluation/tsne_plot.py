"""t-SNE coordinates (scikit-learn) and the figure of ``medalign-eval tsne``: one panel per layer.

:func:`embed` runs :class:`sklearn.manifold.TSNE` with a fixed ``random_state``: on features (PCA to
50 dimensions first when they have more, as scikit-learn's documentation advises; ``init="pca"``)
or on a precomputed distance matrix (``init="random"``, which precomputed distances require). The
perplexity is clipped to (M - 1) / 3 for M points (at least 1), so few tokens still embed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Features wider than this go through PCA before t-SNE.
PCA_DIMS = 50


def clipped_perplexity(perplexity: float, points: int) -> float:
    return float(max(1.0, min(float(perplexity), (points - 1) / 3.0)))


def embed(x: np.ndarray, perplexity: float = 30.0, seed: int = 0, *, precomputed: bool = False) -> np.ndarray:
    """[M, 2] t-SNE coordinates of ``x`` ([M, d] features, or an [M, M] distance matrix)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float64)
    m = x.shape[0]
    p = clipped_perplexity(perplexity, m)
    if precomputed:
        d = np.clip((x + x.T) / 2.0, 0.0, None)
        np.fill_diagonal(d, 0.0)
        return TSNE(2, perplexity=p, metric="precomputed", init="random", random_state=seed).fit_transform(d)
    if x.shape[1] > PCA_DIMS and m > PCA_DIMS:
        x = PCA(PCA_DIMS, random_state=seed).fit_transform(x)
    return TSNE(2, perplexity=p, init="pca", random_state=seed).fit_transform(x)


def _score_line(panel: dict[str, Any]) -> str:
    parts = []
    if panel.get("probe") is not None:
        parts.append(f"probe {panel['probe']:.2f}")
    if panel.get("silhouette") is not None:
        parts.append(f"silhouette {panel['silhouette']:.2f}")
    return ", ".join(parts)


def write_figure(panels: list[dict[str, Any]], names: dict[int, str], out: str | Path, *, suptitle: str = "") -> None:
    """One scatter per panel (``{"title", "xy" [M, 2], "labels" [M], "probe", "silhouette"}``),
    coloured by region (the same colour for a region in every panel), one legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    values = sorted(names)
    cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
    colour = {v: cmap(i % cmap.N) for i, v in enumerate(values)}
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.9), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        xy, lab = np.asarray(panel["xy"]), np.asarray(panel["labels"])
        for v in values:
            sel = lab == v
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colour[v], label=names[v], alpha=0.8, linewidths=0)
        ax.set_title(panel["title"] + ("\n" + _score_line(panel) if _score_line(panel) else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", ls="", color=colour[v], label=names[v]) for v in values]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(values), 6), fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(out, dpi=120)
    plt.close(fig)


__all__ = ["PCA_DIMS", "clipped_perplexity", "embed", "write_figure"]
