"""``medalign-cache demo``: a cache build with a tiny random-weight expert, nothing downloaded.

Without ``--data`` it also generates the inputs: synthetic "scans" of mixed sizes and modes and a
LLaVA-style dataset (:mod:`shared.demo_data`). With ``--data``/``--image-root`` it builds over
those (the full pipeline demo, ``medalign-eval demo``, uses this).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from shared.demo_data import make_demo_dataset
from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.tiny import save_tiny_unimed

DEMO_GRID = 4  # the tiny demo student's grid (32 px images, 8 px patches)


def run_demo(out: Path, images: int = 24, data: tuple[Path, ...] = (), image_root: Path | None = None,
             grid: int = DEMO_GRID) -> None:
    work = out.parent / "demo-inputs"
    work.mkdir(parents=True, exist_ok=True)
    if not data:
        made = make_demo_dataset(work, images)
        data, image_root = (made["train"], made["test"]), made["images"]
    elif image_root is None:
        raise click.UsageError("--data needs --image-root")
    weights = work / "tiny-unimed-b.pt"
    cfg_path = work / "tiny-unimed-b.json"
    if not weights.is_file():
        cfg_path.write_text(json.dumps(save_tiny_unimed(weights, "b"), indent=1))
    cfg = BuildConfig(expert="unimed-b", weights=weights, data=tuple(data), image_root=image_root,
                      grid=grid, out=out, num_workers=0, batch_size=8, model_config=cfg_path,
                      resume=(out / "manifest.json").is_file() or (out / ".progress").is_dir())
    manifest = build_cache(cfg)
    click.echo(manifest.describe())
    first = sorted(Path(image_root).iterdir())[0]
    click.echo(f"\ncache: {out}\ninputs: {work}\nnext: medalign-cache info {out}; "
               f"medalign-cache show {out} --image {first} --out {out.parent / 'fig.png'}")
