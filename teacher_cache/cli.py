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
@click.option("--signals", type=click.Choice(["medalign", "a3tune"]), default="medalign", show_default=True,
              help="medalign = expert CLIP similarity + attention targets; a3tune = SAM weak masks ranked by "
                   "BiomedCLIP per question.")
@click.option("--expert", help="Expert CLIP: unimed-l (default in the paper), unimed-b, biomedclip (medalign).")
@click.option("--weights", type=click.Path(exists=True, path_type=Path),
              help="UniMed-CLIP .pt checkpoint, or a BiomedCLIP directory (open_clip_config.json + .bin) (medalign).")
@click.option("--sam", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="SAM's original .pth, e.g. sam_vit_h_4b8939.pth (a3tune).")
@click.option("--biomedclip", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="BiomedCLIP open_clip directory with its BERT config.json and vocab.txt (a3tune).")
@click.option("--data", "data", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="LLaVA-style JSON dataset; repeat to share one cache between datasets.")
@click.option("--image-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory the datasets' image paths are relative to.")
@click.option("--grid", type=int, help="Student grid side G (24 for 576 image tokens).")
@click.option("--student", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="HF-format LLaVA model dir; its vision config gives the grid (a3tune: its image mean the pad colour).")
@click.option("--geometry", type=click.Choice(["pad", "crop", "stretch"]), default="pad", show_default=True,
              help="pad = the student's pad-to-square view; crop = the MedAlign reference's centre crop; "
                   "stretch = the A3Tune authors' 256 x 256 stretch in BGR (a3tune).")
@click.option("--resample-order", type=click.Choice(list(RESAMPLE_ORDERS)), default=None,
              help="How a g x g expert's patch features reach the student's G x G grid (g != G): "
                   "norm-resample-norm = L2-normalise, resample, L2-normalise again (the reference's UniMed-B "
                   "notebook); resample-norm = resample the raw tokens, then normalise (its BiomedCLIP "
                   "notebook). Default: the expert's own notebook's order. No effect when g == G.")
@click.option("--top-k", type=int, default=None, help="Masks kept per question (a3tune; default 8, report 4).")
@click.option("--query-template", default="vqa-rad", show_default=True,
              help="a3tune query text: vqa-rad | slake | pathvqa | report (the authors' texts verbatim) or "
                   "literal TEXT (the question is appended).")
@click.option("--sam-settings", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON object of SAM generator settings overriding the authors' (a3tune; e.g. fast smoke runs).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache directory to create.")
@click.option("--format", "storage", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option("--dtype", "sim_dtype", type=click.Choice(["float16", "int8"]), default="float16", show_default=True,
              help="Encoding of the similarity triangle.")
@click.option("--batch-size", type=int, default=None, help="Images per forward (default 32; a3tune 8).")
@click.option("--num-workers", type=int, default=2, show_default=True, help="Image-decoding worker processes.")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:K (bf16 on CUDA).")
@click.option("--shard-size", type=int, default=None, help="Rows per shard file (default 256; a3tune 128).")
@click.option("--resume", is_flag=True, help="Finish an interrupted build in --out (a3tune: also re-select a "
                                             "finished cache for a new --top-k / --query-template).")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images in the manifest and go on.")
@click.option("--model-config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="open_clip model config JSON for a UniMed-format checkpoint of a non-standard size.")
def build(signals, expert, weights, sam, biomedclip, data, image_root, grid, student, geometry, resample_order, top_k,
          query_template, sam_settings, out, storage, sim_dtype, batch_size, num_workers, device, shard_size, resume,
          skip_bad, model_config):
    """Run the teachers once over the datasets and write the cache.

    Under torchrun (torchrun --nproc-per-node K -m teacher_cache.cli build ...) the K ranks share
    the shards, each on cuda:LOCAL_RANK; the cache is the same as a one-process build's. With
    --signals a3tune put -- before build (torchrun's parser takes --signals for its --signals-to-handle)."""
    from shared.grid import student_grid
    if (grid is None) == (student is None):
        raise MedAlignError("give exactly one of --grid G or --student MODEL_DIR")
    if student is not None:
        grid = student_grid(student)
    if signals == "a3tune":
        _build_a3(sam, biomedclip, data, image_root, grid, student, geometry, top_k, query_template, sam_settings,
                  out, storage, batch_size, num_workers, device, shard_size, resume, skip_bad)
        return
    from teacher_cache.build import BuildConfig, build_cache
    from teacher_cache.experts import get_expert
    if expert is None or weights is None:
        raise MedAlignError("--signals medalign needs --expert and --weights")
    if geometry == "stretch":
        raise MedAlignError("--geometry stretch is A3Tune's (--signals a3tune); MedAlign builds use pad or crop")
    get_expert(expert)
    cfg = BuildConfig(expert=expert, weights=weights, data=tuple(data), image_root=image_root, grid=grid, out=out,
                      geometry=geometry, resample_order=resample_order, storage=storage, sim_dtype=sim_dtype,
                      batch_size=batch_size or 32, num_workers=num_workers, device=device, resume=resume,
                      skip_bad=skip_bad, shard_size=shard_size or 256, model_config=model_config)
    stats: dict = {}
    manifest = build_cache(cfg, stats)
    from shared.distributed import world_from_env
    if not world_from_env().is_main:  # torchrun: rank 0 reports for the job
        return
    click.echo(f"cache written: {out} ({manifest.rows} images, grid {manifest.grid}x{manifest.grid}, "
               f"{len(manifest.failures)} failures)")
    if stats.get("computed"):
        click.echo(f"computed {stats['computed']} images in {stats['compute_s']:.1f}s "
                   f"({stats['computed'] / max(stats['compute_s'], 1e-9):.1f} images/s; planning "
                   f"{stats['plan_s']:.1f}s, loading the expert {stats['load_s']:.1f}s)")
    for f in manifest.failures[:10]:
        click.echo(f"  skipped {f['path']}: {f['reason']}")


def _build_a3(sam, biomedclip, data, image_root, grid, student, geometry, top_k, query_template, sam_settings, out,
              storage, batch_size, num_workers, device, shard_size, resume, skip_bad):
    from shared.records import read_json
    from teacher_cache.a3tune.build import A3BuildConfig, build_a3_cache, student_background
    if sam is None or biomedclip is None:
        raise MedAlignError("--signals a3tune needs --sam and --biomedclip")
    if geometry == "crop":
        raise MedAlignError("--geometry crop is MedAlign's; A3Tune builds use pad or stretch")
    settings = read_json(sam_settings) if sam_settings is not None else None
    if settings is not None and not isinstance(settings, dict):
        raise MedAlignError(f"--sam-settings {sam_settings}: expected a JSON object of SAM settings")
    extra = {"background": student_background(student)} if student is not None else {}
    cfg = A3BuildConfig(sam=sam, biomedclip=biomedclip, data=tuple(data), image_root=image_root, grid=grid, out=out,
                        top_k=top_k, query_template=query_template, geometry=geometry, sam_settings=settings,
                        storage=storage, batch_size=batch_size or 8, num_workers=num_workers, device=device,
                        resume=resume, skip_bad=skip_bad, shard_size=shard_size or 128, **extra)
    stats: dict = {}
    m = build_a3_cache(cfg, stats)
    from shared.distributed import world_from_env
    if not world_from_env().is_main:  # torchrun: rank 0 reports for the job
        return
    sel = m.selection
    click.echo(f"A3 cache written: {out} ({m.rows} images, grid {m.grid}x{m.grid}, {sel['questions']} questions, "
               f"top-{sel['top_k']} of template {sel['template']!r}, {sel.get('no_labels', 0)} without labels, "
               f"{len(m.failures)} failures)")
    if stats.get("computed"):
        click.echo(f"computed {stats['computed']} images in {stats['compute_s']:.1f}s; selection {stats['select_s']:.1f}s")
    elif stats.get("reselected"):
        click.echo(f"re-selected from the stored crop features in {stats['select_s']:.1f}s (SAM not run)")
    for f in m.failures[:10]:
        click.echo(f"  skipped {f['path']}: {f['reason']}")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@main.command()
@click.argument("cache", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead.")
def info(cache, as_json):
    """Describe a cache: provenance, encodings, rows, size on disk."""
    from shared.cache import open_cache
    from shared.cache.a3tune import is_a3_cache
    if is_a3_cache(cache):
        _info_a3(cache, as_json)
        return
    reader = open_cache(cache)
    m = reader.manifest
    if as_json:
        click.echo(json.dumps(m.to_json(), indent=1))
        return
    size = _dir_size(cache)
    click.echo(m.describe())
    click.echo(f"indexed paths {len(reader.index)}")
    click.echo(f"size on disk  {size / 1e6:.2f} MB, {size / max(m.rows, 1) / 1e3:.1f} KB per image")


def _info_a3(cache: Path, as_json: bool) -> None:
    from shared.cache.a3tune import open_a3_cache
    reader = open_a3_cache(cache)
    m = reader.manifest
    if as_json:
        click.echo(json.dumps(m.to_json(), indent=1))
        return
    sel = m.selection
    selection = sum(_dir_size(cache / f) if (cache / f).is_dir() else (cache / f).stat().st_size
                    for f in [sel["name"] if m.storage == "zarr" else f"{sel['name']}.h5"] if (cache / f).exists())
    images = sum((cache / f).stat().st_size for s in m.shards for f in s["files"] if (cache / f).is_file())
    click.echo(m.describe())
    click.echo(f"indexed paths {len(reader.index)}")
    click.echo(f"size on disk  {_dir_size(cache) / 1e6:.2f} MB: images {images / max(m.rows, 1) / 1e3:.1f} KB per "
               f"image, selection {selection / max(int(sel['questions']), 1):.0f} bytes per question")


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

    from shared.cache.a3tune import is_a3_cache
    if is_a3_cache(cache):
        if recompute:
            raise MedAlignError("--recompute is for MedAlign caches; an A3 cache is checked without its models")
        from teacher_cache.verify import verify_a3
        if not verify_a3(cache, read_rows, click.echo):
            sys.exit(1)
        return

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
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The image to show (a MedAlign cache).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Figure file (.png).")
@click.option("--patch", type=int, default=None, help="Patch whose similarity row to show (default: the most attended).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A3 cache: the dataset JSON holding the question.")
@click.option("--image-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A3 cache: the datasets' image root.")
@click.option("--question", default=None, help="A3 cache: the question id (default: the first with labels).")
def show(cache, image, out, patch, data, image_root, question):
    """Plot E_a over the image beside one patch's similarity row (paper Fig. 2c in spirit); for an A3 cache, the
    image with a question's top-k masks."""
    from shared.cache.a3tune import is_a3_cache
    if is_a3_cache(cache):
        if data is None or image_root is None:
            raise MedAlignError("show on an A3 cache needs --data and --image-root (the question's record and image)")
        from teacher_cache.show import plot_a3_entry
        key, k = plot_a3_entry(cache, data, image_root, out, question)
        click.echo(f"wrote {out} (question {key}, {k} mask(s))")
        return
    if image is None:
        raise MedAlignError("show needs --image")
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


@main.command("lesion-expert")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint file to write (its model config goes next to it, suffix .json).")
@click.option("--image-size", type=int, default=48, show_default=True)
@click.option("--patch-size", type=int, default=8, show_default=True)
def lesion_expert(out, image_size, patch_size):
    """Write the grounding benchmark's tiny unimed-b expert (hand-set weights: its CLS attention
    falls on bright lesions); build a cache with it via --expert unimed-b --model-config OUT.json."""
    from teacher_cache.lesion_expert import save_lesion_unimed
    save_lesion_unimed(out, image_size, patch_size)
    click.echo(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
