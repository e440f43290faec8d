"""``medalign-eval tsne``: the student's visual tokens by region per layer, t-SNE figure + separability JSON.

The options are generated from :class:`~evaluation.tsne_config.TsneConfig` (field docstrings are the
help); importing this module imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import click

from evaluation.tsne_config import TsneConfig
from shared.cli import dataclass_options, user_errors


@click.command()
@dataclass_options(TsneConfig)
def tsne(**flags) -> None:
    """t-SNE of the student's visual tokens at several decoder layers, coloured by region (paper
    Figs. 1 and 5), with a separability score per layer (linear probe split by image, silhouette)
    written beside the figure (same stem, .json); --expert-cache adds the expert's panel."""
    with user_errors():
        from evaluation.tsne import run_tsne

        cfg = TsneConfig(**{k: v for k, v in flags.items() if v is not None})
        result = run_tsne(cfg, log=lambda m: click.echo(m, err=True))
        for layer, s in result["layers"].items():
            probe = ("n/a" if s["probe_accuracy"] is None else
                     f"{s['probe_accuracy']:.3f} (balanced {s['probe_balanced_accuracy']:.3f})")
            sil = "n/a" if s["silhouette"] is None else f"{s['silhouette']:.3f}"
            click.echo(f"layer {layer}: probe accuracy {probe}, majority share {s['majority_fraction'] or 0:.3f}, "
                       f"silhouette {sil}")
        if result["expert"] is not None:
            e = result["expert"]
            sil = "n/a" if e["within_image_silhouette"] is None else f"{e['within_image_silhouette']:.3f}"
            click.echo(f"expert {e['expert']}: within-image silhouette {sil} ({e['images']} images)")
