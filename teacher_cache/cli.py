"""``medalign-cache``: build, inspect, verify and visualise teacher caches.

A :class:`~shared.errors.MedAlignError` ends a command with ``Error: ...`` and exit status 2
(:class:`shared.cli.UserErrorGroup`); ``verify`` exits 1 when the cache fails its checks."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import click

from shared.cli import UserErrorGroup
from shared.errors import MedAlignError
from shared.grid import RESAMPLE_ORDERS


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Build and inspect MedAlign teacher caches (expert CLIP similarity + attention targets)."""


@main.command()
@click.option("--expert", required=True, help="Expert CLIP: unimed-l (default in the paper), unimed-b, biomedclip.")
@click.option("--weights", required=True, type=click.Path(exists=True, path_type=Path),
              help="UniMed-CLIP .pt checkpoint, or a BiomedCLIP directory (open_clip_config.json + .bin).")
@click.option("--data", "data", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="LLaVA-style JSON dataset; repeat to share one cache between datasets.")
@click.option("--image-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory the datasets' image paths are relative to.")
@click.option("--grid", type=int, help="Student grid side G (24 for 576 image tokens).")
@click.option("--student", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="HF-format LLaVA model dir; its vision config gives the grid.")
@click.option("--geometry", type=click.Choice(["pad", "crop"]), default="pad", show_default=True,
              help="pad = the student's pad-to-square view; crop = the reference's centre crop.")
@click.option("--resample-order", type=click.Choice(list(RESAMPLE_ORDERS)), default=None,
              help="How a g x g expert's patch features reach the student's G x G grid (g != G): "
                   "norm-resample-norm = L2-normalise, resample, L2-normalise again (the reference's UniMed-B "
                   "notebook); resample-norm = resample the raw tokens, then normalise (its BiomedCLIP "
                   "notebook). Default: the expert's own notebook's order. No effect when g == G.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache directory to create.")
@click.option("--format", "storage", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option("--dtype", "sim_dtype", type=click.Choice(["float16", "int8"]), default="float16", show_default=True,
              help="Encoding of the similarity triangle.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True, help="Image-decoding worker processes.")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:K (bf16 on CUDA).")
@click.option("--shard-size", type=int, default=256, show_default=True, help="Rows per shard file.")
@click.option("--resume", is_flag=True, help="Finish an interrupted build in --out.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images in the manifest and go on.")
@click.option("--model-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="open_clip model config JSON for a UniMed-format checkpoint of a non-standard size.")
def build(expert, weights, data, image_root, grid, student, geometry, resample_order, out, storage, sim_dtype,
          batch_size, num_workers, device, shard_size, resume, skip_bad, model_config):
    """Run an expert CLIP once over the datasets and write the teacher cache."""
    from shared.grid import student_grid
    from teacher_cache.build import BuildConfig, build_cache
    from teacher_cache.experts import get_expert
    get_expert(expert)
    if (grid is None) == (student is None):
        raise MedAlignError("give exactly one of --grid G or --student MODEL_DIR")
    if student is not None:
        grid = student_grid(student)
    cfg = BuildConfig(expert=expert, weights=weights, data=tuple(data), image_root=image_root, grid=grid, out=out,
                      geometry=geometry, resample_order=resample_order, storage=storage, sim_dtype=sim_dtype,
                      batch_size=batch_size, num_workers=num_workers, device=device, resume=resume, skip_bad=skip_bad,
                      shard_size=shard_size, model_config=model_config)
    stats: dict = {}
    manifest = build_cache(cfg, stats)
    click.echo(f"cache written: {out} ({manifest.rows} images, grid {manifest.grid}x{manifest.grid}, "
               f"{len(manifest.failures)} failures)")
    if stats.get("computed"):
        click.echo(f"computed {stats['computed']} images in {stats['compute_s']:.1f}s "
                   f"({stats['computed'] / max(stats['compute_s'], 1e-9):.1f} images/s; planning "
                   f"{stats['plan_s']:.1f}s, loading the expert {stats['load_s']:.1f}s)")
    for f in manifest.failures[:10]:
        click.echo(f"  skipped {f['path']}: {f['reason']}")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@main.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead.")
def info(cache, as_json):
    """Describe a cache: provenance, encodings, rows, size on disk."""
    from shared.cache import open_cache
    reader = open_cache(cache)
    m = reader.manifest
    if as_json:
        click.echo(json.dumps(m.to_json(), indent=1))
        return
    size = _dir_size(cache)
    click.echo(m.describe())
    click.echo(f"indexed paths {len(reader.index)}")
    click.echo(f"size on disk  {size / 1e6:.2f} MB, {size / max(m.rows, 1) / 1e3:.1f} KB per image")


@main.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--recompute", type=int, default=0, help="Re-run the expert on N random rows and compare.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), help="Expert weights (for --recompute).")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image root of the datasets (for --recompute).")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:K.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="open_clip model config JSON, as given to build.")
@click.option("--tolerance", type=float, default=None,
              help="Max abs difference accepted by --recompute (default 2e-3 for float16, 6e-3 for int8).")
@click.option("--rows/--no-rows", "read_rows", default=True, show_default=True,
              help="Read every row through the checked reader (chunk checksums, value checks).")
def verify(cache, recompute, weights, image_root, device, seed, model_config, tolerance, read_rows):
    """Check the cache is what its manifest says: structure, file checksums, every row; optionally
    recompute rows with the expert. Exit 0 when it is, 1 when it is not."""
    from tqdm import tqdm

    from shared.cache import open_cache
    from shared.cache.check import check_file_checksums, check_structure
    from shared.errors import CacheDamagedError

    report = check_structure(cache)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    for problem in report.problems:
        click.echo(f"FAIL {problem}", err=True)
    m = report.manifest
    if m is None:  # the manifest itself is damaged or missing: nothing else can be trusted
        click.echo("structure: FAIL (the manifest cannot be used)")
        sys.exit(1)
    click.echo(f"structure: {'OK' if report.ok else f'FAIL ({len(report.problems)} problem(s))'} "
               f"({len(m.shards)} shard(s), {m.rows} rows)")
    nfiles = sum(len(s.get("files") or {}) for s in m.shards)
    with tqdm(total=nfiles, desc="file checksums", disable=None, leave=False) as bar:
        nfiles, bad = check_file_checksums(cache, m, bar.update)
    for b in bad:
        click.echo(f"FAIL {b}", err=True)
    click.echo(f"checksums: {nfiles - len(bad)}/{nfiles} files OK")
    ok = report.ok and not bad
    reader = open_cache(cache)
    if read_rows and ok:
        damaged, keys = [], reader.keys()
        for row in tqdm(range(m.rows), desc="rows", disable=None, leave=False):
            if not keys[row]:
                continue  # a failed row (--skip-bad): zeros by design
            try:
                reader.read(row)
            except CacheDamagedError as e:
                damaged.append(str(e))
        for d in damaged[:20]:
            click.echo(f"FAIL {d}", err=True)
        click.echo(f"rows: {m.rows - len(damaged)}/{m.rows} read back and passed the value checks")
        ok = ok and not damaged
    if recompute:
        if weights is None or image_root is None:
            raise MedAlignError("--recompute needs --weights and --image-root")
        from teacher_cache.verify import recompute_rows
        rows_by_path = {}
        for rel, row in reader.index.items():
            rows_by_path.setdefault(row, rel)
        rows = sorted(random.Random(seed).sample(sorted(rows_by_path), min(recompute, len(rows_by_path))))
        d_sim, d_attn = recompute_rows(reader, weights, image_root, {r: rows_by_path[r] for r in rows}, device,
                                       model_config)
        tol = tolerance if tolerance is not None else (6e-3 if m.sim_dtype == "int8" else 2e-3)
        click.echo(f"recomputed {len(rows)} rows: max |d sim| = {d_sim:.3g}, max |d attn| = {d_attn:.3g} "
                   f"(tolerance {tol:g})")
        ok = ok and d_sim <= tol and d_attn <= tol
    if not ok:
        sys.exit(1)


@main.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Figure file (.png).")
@click.option("--patch", type=int, default=None, help="Patch whose similarity row to show (default: the most attended).")
def show(cache, image, out, patch):
    """Plot E_a over the image beside one patch's similarity row (paper Fig. 2c in spirit)."""
    from teacher_cache.show import plot_entry
    used = plot_entry(cache, image, out, patch)
    click.echo(f"wrote {out} (similarity row of patch {used})")


@main.command()
@click.option("--out", default="medalign-demo/cache", show_default=True, type=click.Path(path_type=Path))
@click.option("--images", type=int, default=24, show_default=True, help="Number of synthetic images.")
@click.option("--data", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Build over these datasets instead of generated ones.")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--grid", type=int, default=4, show_default=True, help="Student grid (the tiny demo student's is 4).")
def demo(out, images, data, image_root, grid):
    """Build a cache with a tiny random-weight expert (no downloads), over generated images by default."""
    from teacher_cache.demo import run_demo
    run_demo(out, images, tuple(data), image_root, grid)


if __name__ == "__main__":
    main()
