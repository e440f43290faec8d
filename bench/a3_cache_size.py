"""Size of an A3Tune cache per image and per question, on synthetic arrays of realistic shape (no models).

~25 masks per image (Poisson), random ellipses on the 24 x 24 grid, 512-d unit crop features, 7 questions
per image with top-8; written through the real A3Writer in both formats. Run: python bench/a3_cache_size.py
"""
import shutil
import tempfile

import numpy as np
from pathlib import Path

from shared.cache.a3_writer import A3Writer
rng = np.random.default_rng(0)
G, D, R, QPI, K = 24, 512, 256, 7, 8
for storage in ("zarr", "hdf5"):
    out = Path(tempfile.mkdtemp()) / "c"
    max_masks = 384
    ident = {"sam": {"sha256": "0"*64, "settings": {}}, "biomedclip": {"dir_sha256": "0"*64}, "geometry": "pad",
             "background": [122,116,104], "grid": G, "view_size": 256, "max_masks": max_masks}
    keys = [f"{i:064x}" for i in range(R)]
    w = A3Writer(out, identity=ident, keys=keys, index={f"i{i}.jpg": i for i in range(R)}, embed_dim=D, storage=storage)
    yy, xx = np.mgrid[0:G, 0:G]
    counts_all = []
    for s in w.pending_shards():
        rows = w.shard_rows(s)
        counts = rng.poisson(25, len(rows)).clip(0, max_masks).astype(np.int16)
        masks = np.zeros((len(rows), max_masks * 72), np.uint8); emb = np.zeros((len(rows), max_masks * D), np.float32)
        for i, c in enumerate(counts):
            cells = []
            for j in range(c):
                cy, cx, ry, rx = rng.uniform(3, 21), rng.uniform(3, 21), rng.uniform(1, 6), rng.uniform(1, 6)
                cells.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
            if c:
                masks[i, :c * 72] = np.packbits(np.stack(cells).reshape(c, -1), axis=1).reshape(-1)
                e = rng.normal(size=(c, D)).astype(np.float32); e /= np.linalg.norm(e, axis=1, keepdims=True)
                emb[i, :c * D] = e.reshape(-1)
        counts_all += counts.tolist()
        w.write_shard(s, counts, masks, emb)
    Q = R * QPI
    idx = np.full((Q, K), -1, np.int16); sc = np.zeros((Q, K), np.float32)
    for q in range(Q):
        c = counts_all[q // QPI]; k = min(K, c)
        idx[q, :k] = rng.permutation(c)[:k]; sc[q, :k] = np.sort(rng.uniform(0.2, 0.4, k))[::-1]
    arrays = {"qkey": [str(1000 + q) for q in range(Q)], "image_row": np.arange(Q, dtype=np.int32) // QPI,
              "query_sha": [f"{rng.integers(1<<62):064x}" for q in range(Q)], "top_idx": idx, "top_score": sc}
    m = w.finish(selection={"name": "selection-test", "template": "vqa-rad", "top_k": K, "questions": Q, "texts": Q},
                 arrays=arrays, sam={"sha256": "0"*64, "settings": {}, "arch": "x"}, biomedclip={"dir_sha256": "0"*64})
    img = sum((out / f).stat().st_size for s in m.shards for f in s["files"])
    sel = sum((out / f).stat().st_size for f in m.selection["files"])
    mask_only = sum((out / f).stat().st_size for s in m.shards for f in s["files"] if "masks" in f) if storage == "zarr" else 0
    extra = f"(packed masks alone {mask_only / R:.0f} B)" if mask_only else ""
    print(storage, f"mean masks {np.mean(counts_all):.1f}: {img / R / 1e3:.1f} KB per image {extra}, {sel / Q:.1f} bytes per question")
    shutil.rmtree(out.parent)
