"""``medalign-cache demo``: a cache build on generated images with a tiny random-weight expert.

Everything is generated locally (no downloads): a tiny UniMed-format checkpoint, a set of
synthetic "scans" of mixed sizes and modes, and a LLaVA-style dataset file.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from PIL import Image

from teacher_cache.build import BuildConfig, build_cache
from teacher_cache.tiny import save_tiny_unimed

DEMO_GRID = 4  # the tiny demo student's grid (32 px images, 8 px patches)


def make_images(root: Path, count: int, seed: int = 0) -> list[str]:
    """Synthetic grayscale/RGB 'scans': a bright blob on a noisy background, mixed sizes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(6, 16)
        img = 40 + 20 * rng.standard_normal((h, w)) + 180 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        arr = np.clip(img, 0, 255).astype(np.uint8)
        pil = Image.fromarray(arr, "L") if i % 2 else Image.fromarray(np.stack([arr] * 3, -1), "RGB")
        name = f"scan{i:03d}.png"
        pil.save(root / name)
        names.append(name)
    return names


def make_dataset(path: Path, images: list[str]) -> None:
    recs = []
    for i, name in enumerate(images):
        recs.append({"id": i, "image": name, "answer_type": "CLOSED",
                     "conversations": [{"from": "human", "value": "<image>\nIs there a bright lesion?"},
                                       {"from": "gpt", "value": "yes"}]})
    path.write_text(json.dumps(recs, indent=1))


def run_demo(out: Path, images: int = 24) -> None:
    work = out.parent / "demo-inputs"
    names = make_images(work / "images", images)
    make_dataset(work / "data.json", names)
    weights = work / "tiny-unimed-b.pt"
    cfg_path = work / "tiny-unimed-b.json"
    cfg_path.write_text(json.dumps(save_tiny_unimed(weights, "b"), indent=1))
    cfg = BuildConfig(expert="unimed-b", weights=weights, data=(work / "data.json",), image_root=work / "images",
                      grid=DEMO_GRID, out=out, num_workers=0, batch_size=8, model_config=cfg_path,
                      resume=(out / "manifest.json").is_file() or (out / ".progress").is_dir())
    manifest = build_cache(cfg)
    click.echo(manifest.describe())
    click.echo(f"\ncache: {out}\ninputs: {work}\nnext: medalign-cache info {out}; "
               f"medalign-cache show {out} --image {work / 'images' / names[0]} --out {out.parent / 'fig.png'}")
