"""Benchmark: the teacher-cache build and store against the reference's way.

In one run, on the same images and the same expert (random weights, real architecture):

* reference loop: batch 1, per-image preprocessing in the main process, fp32, every full N x N
  float32 matrix kept in one dict and pickled at the end (what the published notebooks do);
* ours: ``build_cache`` (batched, DataLoader workers, packed float16 / int8 triangles, sharded zarr).

Reports build images/s (ratio; ours end to end, i.e. with hashing the weights and loading the
expert, and ours in its compute phase, which is what the reference loop's time covers), bytes per image (ratio) and max abs error of each encoding against
the reference's float32 matrices, single-process random reads/s, and reader RSS at 1k vs 10k rows.

    python bench/cache.py                     # CPU, ViT-B/16 (unimed-b) at full size
    python bench/cache.py --device cuda --arch l --count 512 --skip-store   # GPU, ViT-L/14-336
    python bench/cache.py --reads-only --count 32   # only the read-check comparison below

Read checks (issue 15): random reads/s of this tree's reader (per-chunk crc32c / fletcher32 and the
value checks) on a cache it wrote, against the reader of ``--baseline-rev`` (default ``f1a668c``, the
last commit before the checks; checked out into a temporary git worktree) on a cache in that
commit's layout (no chunk checksums, no manifest checksum), same matrices, same rows, alternating
``--rounds`` times; zarr and HDF5. Also this tree's reader with everything off (the old-layout
cache, value checks off), which isolates what the checks themselves cost.

The pickle below exists only to measure the reference's file size: it is written, never loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle  # noqa: S403 - baseline size measurement only (dumps, never loads)
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))  # the arrays -> cache test helper

from cache_helpers import write_cache  # noqa: E402
from shared.cache import open_cache  # noqa: E402
from shared.images import load_image  # noqa: E402
from teacher_cache.build import BuildConfig, build_cache  # noqa: E402
from teacher_cache.experts import load_expert  # noqa: E402
from teacher_cache.signals import teacher_signals  # noqa: E402
from teacher_cache.tiny import save_random_unimed  # noqa: E402


def make_dataset(path: Path, images: list[str]) -> None:
    path.write_text(json.dumps([{"id": i, "image": name} for i, name in enumerate(images)]))


def _images(args, work: Path) -> tuple[Path, list[str]]:
    real = REPO.parent / "shared" / "data" / "vqa-rad" / "images"
    if args.images:
        root = Path(args.images)
    elif real.is_dir():
        root = real
    else:  # synthetic 512 x 512 'scans' (the device machine has no ../shared)
        from PIL import Image
        root = work / "images"
        root.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.count):
            arr = (rng.random((384 + 16 * (i % 8), 512)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"img{i:04d}.jpg", quality=90)
    names = sorted(p.name for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return root, names[: args.count]


def reference_loop(expert, root: Path, names: list[str], grid: int, device: str) -> tuple[float, dict]:
    """Batch 1, per-image preprocessing, fp32, full float32 matrices in a dict."""
    out = {}
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for name in names:
        img, _ = load_image(root / name)
        pixels = torch.from_numpy(expert.preprocess(img))[None].to(device)
        e_v, e_a = expert.encode(pixels)
        sim, attn = teacher_signals(e_v, e_a, grid)
        out[name] = {"sim": sim[0].cpu().numpy(), "attn": attn[0].cpu().numpy()}
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


_READ = r"""
import sys, time, os, numpy as np, psutil
sys.path.insert(0, os.getcwd())
from shared.cache import open_cache
r = open_cache(sys.argv[1]) if sys.argv[3] == "1" else open_cache(sys.argv[1], check_values=False)
rows = len(r); rng = np.random.default_rng(1)
order = rng.integers(0, rows, int(sys.argv[2]))
r.read(0)
t0 = time.perf_counter()
for i in order: r.read(int(i))
dt = time.perf_counter() - t0
print(len(order) / dt, psutil.Process(os.getpid()).memory_info().rss)
"""


def _read_bench(cache: Path, reads: int, repo: Path = REPO, checks: bool = True) -> tuple[float, int]:
    """Random reads/s and RSS of a fresh process reading ``cache`` with the reader of ``repo``
    (``checks=False``: this tree's reader with its value checks off)."""
    out = subprocess.run([sys.executable, "-c", _READ, str(cache), str(reads), "1" if checks else "0"],
                         capture_output=True, text=True, check=True, cwd=repo)
    rate, rss = out.stdout.split()
    return float(rate), int(rss)


def _read_checks(work: Path, sims, attns, args) -> dict:
    """The read-check comparison (module docstring): medians over ``args.rounds`` alternations."""
    from statistics import median

    from cache_helpers import make_legacy_manifest
    from shared.cache.check import check_structure

    base_repo = work / "baseline-tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_repo), args.baseline_rev],
                   check=True, capture_output=True)
    res: dict = {"read_checks_baseline_rev": args.baseline_rev}
    try:
        rows = args.check_rows
        idx = np.arange(rows) % len(sims)
        keys = [f"{i + 1:064x}" for i in range(rows)]
        index = {f"{i}.jpg": i for i in range(rows)}
        for fmt in ("zarr", "hdf5"):
            old = write_cache(work / f"checks-{fmt}-old", _Rows(sims, idx), attns[idx], keys, index, format=fmt,
                              chunk_checksums=False)
            make_legacy_manifest(old)  # the baseline's manifest: without the keys it does not know
            new = write_cache(work / f"checks-{fmt}", _Rows(sims, idx), attns[idx], keys, index, format=fmt)
            t0 = time.perf_counter()
            if not check_structure(new).ok:
                raise RuntimeError(f"the benchmark's own cache {new} fails its structural checks")
            res[f"structure_check_ms_{fmt}"] = 1e3 * (time.perf_counter() - t0)  # what medalign-train adds
            today, checked, unchecked = [], [], []
            for _ in range(args.rounds):
                today.append(_read_bench(old, args.reads, base_repo)[0])
                checked.append(_read_bench(new, args.reads)[0])
                unchecked.append(_read_bench(old, args.reads, checks=False)[0])  # this tree, no checks at all
            res[f"reads_s_{fmt}_baseline"] = median(today)
            res[f"reads_s_{fmt}_checked"] = median(checked)
            res[f"reads_{fmt}_checked_vs_baseline"] = median(checked) / median(today)
            res[f"reads_s_{fmt}_unchecked"] = median(unchecked)
            res[f"reads_{fmt}_checked_vs_unchecked"] = median(checked) / median(unchecked)  # the checks' own cost
            res[f"reads_s_{fmt}_rounds"] = {"baseline": today, "checked": checked, "unchecked": unchecked}
            shutil.rmtree(old)
            shutil.rmtree(new)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_repo)], check=False,
                       capture_output=True)
    return res


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["b", "l"], default="b", help="b: ViT-B/16 @224, l: ViT-L/14 @336")
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--count", type=int, default=96, help="images to build over")
    ap.add_argument("--images", help="image directory (default: ../shared VQA-RAD, else synthetic)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--rss-rows", default="1000,10000")
    ap.add_argument("--skip-store", action="store_true", help="only the build throughput")
    ap.add_argument("--reads-only", action="store_true", help="only the read-check comparison (no build timing)")
    ap.add_argument("--baseline-rev", default="f1a668c", help="git revision whose reader is the read-check baseline")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the read-check comparison")
    ap.add_argument("--check-rows", type=int, default=1000, help="rows of the read-check caches")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="medalign-bench-"))
    res: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} cpus, torch {torch.__version__}",
                 "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    try:
        name = f"unimed-{args.arch}"
        weights = work / "expert.pt"
        save_random_unimed(weights, name)
        root, names = _images(args, work)
        make_dataset(work / "data.json", names)
        res.update(expert=name, images=len(names), grid=args.grid)
        ref_expert = load_expert(name, weights, device=args.device, dtype=torch.float32, geometry="crop")
        reference_loop(ref_expert, root, names[:2], args.grid, args.device)  # warm-up
        ref_s, ref = reference_loop(ref_expert, root, names, args.grid, args.device)
        del ref_expert
        pkl = work / "reference.pkl"
        pkl.write_bytes(pickle.dumps(ref, protocol=pickle.HIGHEST_PROTOCOL))
        res["reference_img_s"] = len(names) / ref_s
        if not args.reads_only:
            ours = {}
            for dtype in ("float16", "int8"):
                cfg = BuildConfig(expert=name, weights=weights, data=(work / "data.json",), image_root=root,
                                  grid=args.grid, out=work / f"cache-{dtype}", geometry="crop", sim_dtype=dtype,
                                  batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                                  progress=False)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                stats: dict = {}
                build_cache(cfg, stats)
                ours[dtype] = time.perf_counter() - t0
                if dtype == "float16":
                    res["ours_compute_img_s"] = stats["computed"] / stats["compute_s"]
                    res["ours_setup_s"] = stats["plan_s"] + stats["load_s"]
                reader = open_cache(cfg.out)
                err = max(float(np.abs(reader.get(n)[0] - ref[n]["sim"]).max()) for n in names)
                res[f"{dtype}_bytes_per_image"] = _dir_bytes(cfg.out) / len(names)
                res[f"{dtype}_max_abs_err"] = err
                if args.skip_store:
                    break
            res["ours_img_s"] = len(names) / ours["float16"]
            res["build_speedup_end_to_end"] = res["ours_img_s"] / res["reference_img_s"]
            res["build_speedup_compute"] = res["ours_compute_img_s"] / res["reference_img_s"]
            res["pickle_bytes_per_image"] = pkl.stat().st_size / len(names)
            for dtype in ours:
                res[f"{dtype}_size_ratio"] = res["pickle_bytes_per_image"] / res[f"{dtype}_bytes_per_image"]
        if not args.skip_store:
            # stores of 1k and 10k rows made of the real matrices, repeated
            sims = np.stack([ref[n]["sim"] for n in names])
            attns = np.stack([ref[n]["attn"] for n in names])
            for rows in ([] if args.reads_only else (int(x) for x in args.rss_rows.split(","))):
                idx = np.arange(rows) % len(names)
                out = work / f"rows-{rows}"
                write_cache(out, _Rows(sims, idx), attns[idx], [f"{i:064x}" for i in range(rows)],
                            {f"{i}.jpg": i for i in range(rows)})
                rate, rss = _read_bench(out, args.reads)
                res[f"reads_s_{rows}"] = rate
                res[f"reader_rss_mb_{rows}"] = rss / 1e6
                shutil.rmtree(out)
            res.update(_read_checks(work, sims, attns, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


class _Rows:
    """Lazily repeated (rows, N, N) view so the 10k-row store needs no 13 GB array in memory."""

    def __init__(self, sims, idx):
        self.sims, self.idx = sims, idx
        self.shape = (len(idx), *sims.shape[1:])

    def __getitem__(self, sl):
        return self.sims[self.idx[sl]]


if __name__ == "__main__":
    main()
