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


def verify_a3(cache: Path, read_rows: bool = True, echo=print) -> bool:
    """``medalign-cache verify`` on an A3 cache: structure, file checksums, every image row and question read
    back through the checked reader. Reports through ``echo``; returns whether the cache is sound."""
    from shared.cache.a3_check import check_a3_files, check_a3_structure, read_every_row

    report = check_a3_structure(cache)
    for note in report.notes:
        echo(f"note: {note}")
    for problem in report.problems:
        echo(f"FAIL {problem}")
    m = report.manifest
    if m is None:
        echo("structure: FAIL (the manifest cannot be used)")
        return False
    echo(f"structure: {'OK' if report.ok else f'FAIL ({len(report.problems)} problem(s))'} ({len(m.shards)} shard(s), "
         f"{m.rows} rows, {m.selection.get('questions')} questions)")
    nfiles, bad = check_a3_files(cache, m)
    for b in bad:
        echo(f"FAIL {b}")
    echo(f"checksums: {nfiles - len(bad)}/{nfiles} files OK")
    ok = report.ok and not bad
    if read_rows and ok:
        rows, questions, damaged = read_every_row(cache)
        for d in damaged[:20]:
            echo(f"FAIL {d}")
        echo(f"rows: {rows} image rows and {questions} questions read back, {len(damaged)} failed the checks")
        ok = ok and not damaged
    return ok
