"""Re-running the expert on cached rows to check a cache against its weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.cache import CacheReader
from shared.errors import MedAlignError
from shared.images import load_image, resolve_image_path
from shared.runtime import resolve_device
from teacher_cache.build import read_model_config
from teacher_cache.experts import load_expert, weights_sha256
from teacher_cache.signals import teacher_signals


def recompute_rows(reader: CacheReader, weights: Path, image_root: Path, rows: dict[int, str], device: str = "cpu",
                   model_config: Path | None = None) -> tuple[float, float]:
    """Max abs differences (sim, attn) between stored rows and a fresh fp32 expert run (with the cache's
    own geometry and resample order)."""
    m = reader.manifest
    device = resolve_device(str(device))
    if weights_sha256(weights) != m.weights_sha256:
        raise MedAlignError(f"--weights {weights} are not the weights this cache was built with "
                            f"(sha256 {m.weights_sha256[:12]}...)")
    expert = load_expert(m.expert, weights, device=device, dtype=torch.float32, geometry=m.geometry,
                         model_cfg=read_model_config(model_config))
    d_sim = d_attn = 0.0
    for row, rel in rows.items():
        img, key = load_image(resolve_image_path(image_root, rel))
        if key != reader.key_of(row):
            raise MedAlignError(f"{rel}: the image file changed since the cache was built")
        e_v, e_a = expert.encode(torch.from_numpy(expert.preprocess(img))[None].to(device))
        sim, attn = teacher_signals(e_v, e_a, m.grid, m.resample_order)
        c_sim, c_attn = reader.read(row)
        d_sim = max(d_sim, float(np.abs(sim[0].cpu().numpy() - c_sim).max()))
        d_attn = max(d_attn, float(np.abs(attn[0].cpu().numpy() - c_attn).max()))
    return d_sim, d_attn
