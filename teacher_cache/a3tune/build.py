"""``medalign-cache build --signals a3tune``: SAM weak masks and BiomedCLIP crop features per image, then
the top-k masks per question, into an A3 cache (:mod:`shared.cache.a3tune`).

Plan (as the MedAlign build, :func:`teacher_cache.build.plan_rows`): unique images by content hash,
rows in first-appearance order; the questions of the ``--data`` files keyed by their ids (duplicate
ids across the files are refused). Image part, shard by shard: DataLoader workers decode each image
and make SAM's 256 x 256 view (:func:`~teacher_cache.a3tune.geometry.sam_view`); the main process
runs SAM's generator per image, cuts each kept mask's crop, embeds the crops of a batch with
BiomedCLIP's image tower, resamples the masks to the student's grid and bit-packs them; batches never
straddle shards, so a resumed build equals an uninterrupted one. Selection, once every shard is in:
the distinct query texts through the text tower, each question's top-k from the *stored* features.
``--resume`` on a finished cache with another ``--top-k`` / ``--query-template`` / question set loads
BiomedCLIP only (never SAM) and redoes the selection (:mod:`shared.cache.a3_writer`). Under ``torchrun``
the ranks share the image shards round-robin as in the MedAlign build (:mod:`shared.cache.parallel`);
rank 0 makes the selection and the manifest once every shard is in, so the cache is a one-process build's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shared.a3_queries import DEFAULT_TOP_K, check_template, query_sha256, query_text, question_key
from shared.cache.a3_manifest import A3Manifest, GEOMETRIES
from shared.cache.a3_writer import DEFAULT_A3_SHARD_SIZE, A3Writer
from shared.cache.writer import normalise_rel
from shared.errors import BadImageError, MedAlignError
from shared.images import decode_image, mean_colour, read_image_bytes, sha256_bytes, sha256_file
from shared.records import load_records, read_json, record_image
from shared.runtime import resolve_device
from teacher_cache.build import plan_rows

#: SAM's input side (the authors' cv2.resize(image, (256, 256)))
VIEW_SIZE = 256
#: the pad colour when no --student is given: LLaVA's CLIP processor mean (OpenAI's)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


@dataclass(frozen=True)
class A3BuildConfig:
    """Settings of one A3Tune cache build (the flags of ``medalign-cache build --signals a3tune``)."""

    sam: Path                        # SAM's original .pth (sam_vit_h_4b8939.pth)
    biomedclip: Path                 # BiomedCLIP open_clip directory with the BERT config + tokenizer
    data: tuple[Path, ...]           # LLaVA-style JSON files sharing this cache
    image_root: Path
    grid: int                        # the student's grid side G
    out: Path
    top_k: int | None = None         # masks kept per question; None: the template's (8 VQA, 4 report)
    query_template: str = "vqa-rad"  # vqa-rad | slake | pathvqa | report | literal TEXT
    geometry: str = "pad"            # pad (the student's view) | stretch (the authors')
    background: tuple[int, int, int] = field(default_factory=lambda: mean_colour(OPENAI_MEAN))
    sam_settings: dict | None = None  # SamSettings fields overriding the authors' defaults
    storage: str = "zarr"
    batch_size: int = 8              # images per BiomedCLIP forward of their crops
    text_batch_size: int = 64
    num_workers: int = 2
    device: str = "cpu"
    resume: bool = False
    skip_bad: bool = False
    shard_size: int = DEFAULT_A3_SHARD_SIZE
    progress: bool = True

    def __post_init__(self):
        if self.grid < 1:
            raise MedAlignError(f"--grid must be >= 1, got {self.grid}")
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise MedAlignError("--batch-size must be >= 1")
        if self.geometry not in GEOMETRIES:
            raise MedAlignError(f"--geometry {self.geometry!r}: choose one of {', '.join(GEOMETRIES)}")
        if not self.data:
            raise MedAlignError("give at least one --data file")
        check_template(self.query_template)
        if self.top_k is None:
            object.__setattr__(self, "top_k", DEFAULT_TOP_K.get(self.query_template, 8))
        if self.top_k < 1:
            raise MedAlignError(f"--top-k must be >= 1, got {self.top_k}")
        object.__setattr__(self, "device", str(resolve_device(self.device)))
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))


def student_background(student: Path) -> tuple[int, int, int]:
    """The pad colour of an HF-format student: its processor's ``image_mean`` as LLaVA pads (OpenAI's if absent)."""
    path = Path(student) / "preprocessor_config.json"
    mean = OPENAI_MEAN
    if path.is_file():
        cfg = read_json(path)
        if isinstance(cfg, dict) and isinstance(cfg.get("image_mean"), list) and len(cfg["image_mean"]) == 3:
            mean = tuple(float(x) for x in cfg["image_mean"])
    return mean_colour(mean)


def mask_slots(settings) -> int:
    """The most masks SAM's generator can return for ``settings``: 3 per point prompt over every crop
    (layer i: 4**i crops of int(points_per_side / factor**i)**2 points), before NMS and the filter."""
    points = sum(4 ** i * int(settings.points_per_side / settings.crop_n_points_downscale_factor ** i) ** 2
                 for i in range(settings.crop_n_layers + 1))
    return 3 * points


def collect_questions(cfg: A3BuildConfig, index: dict[str, int], failed_rows: set[int]) -> tuple[list[dict], int]:
    """Every record with an image whose row did not fail: ``{"qkey", "image_row", "text", "query_sha"}``;
    plus how many records were left out (no image, or a failed one)."""
    seen: dict[str, Path] = {}
    out, left = [], 0
    for data in cfg.data:
        for rec in load_records(data):
            img = record_image(rec)
            if img is None:
                left += 1
                continue
            key = question_key(rec)
            if key in seen:
                raise MedAlignError(f"question id {key!r} occurs twice (in {seen[key]} and {data}); the A3 cache is "
                                    "keyed by record id, so ids must be unique across the --data files")
            seen[key] = data
            row = index.get(normalise_rel(img))
            if row is None or row in failed_rows:
                left += 1
                continue
            text = query_text(rec, cfg.query_template)
            out.append({"qkey": key, "image_row": row, "text": text, "query_sha": query_sha256(text)})
    if not out:
        raise MedAlignError("the --data files hold no question with a usable image")
    return out, left


class _Views(Dataset):
    """Decodes an image in a DataLoader worker and makes SAM's view of it."""

    def __init__(self, paths, keys, geometry: str, background):
        self.paths, self.keys, self.geometry, self.background = paths, keys, geometry, background

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row: int):
        from teacher_cache.a3tune.geometry import sam_view

        try:
            data = read_image_bytes(self.paths[row])
            if sha256_bytes(data) != self.keys[row]:
                raise BadImageError(self.paths[row], "file changed since the build was planned")
            return row, sam_view(decode_image(data, self.paths[row]), self.geometry, self.background), None
        except BadImageError as e:
            return row, None, e.reason


def _collate(items):
    return items


def build_a3_cache(cfg: A3BuildConfig, stats: dict | None = None) -> A3Manifest:
    """Build, resume or re-select (module docstring), holding ``--out``'s build lock throughout.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs this with the same settings, as the MedAlign
    build (:mod:`shared.cache.parallel`): each plans the same rows and computes its round-robin share of
    the pending image shards on ``cuda:LOCAL_RANK`` (or the CPU); rank 0, once every shard is in, writes
    the selection, ``index.json`` and last the manifest.
    """
    from shared.cache.parallel import on_ranks

    return on_ranks(cfg, lambda c, dist: _build(c, dist, {} if stats is None else stats))


def _finished_embed_dim(out: Path) -> int | None:
    """The embed dim a finished A3 cache in ``out`` records (None: no readable one)."""
    if not (out / "manifest.json").is_file():
        return None
    try:
        return A3Manifest.load(out).embed_dim
    except MedAlignError:
        return None


def _build(cfg: A3BuildConfig, dist, stats: dict) -> A3Manifest:
    import time

    from shared.cache.parallel import ShardedBuild
    from teacher_cache.a3tune.biomedclip import biomedclip_sha256, load_biomedclip
    from teacher_cache.a3tune.sam import SamSettings

    t0 = time.perf_counter()
    settings = SamSettings(**(cfg.sam_settings or {}))
    if not Path(cfg.sam).is_file():
        raise MedAlignError(f"--sam {cfg.sam}: not a file (the original SAM .pth)")
    plan = plan_rows(cfg)
    identity = {"sam": {"sha256": sha256_file(cfg.sam), "settings": settings.to_json()},
                "biomedclip": {"dir_sha256": biomedclip_sha256(cfg.biomedclip)}, "geometry": cfg.geometry,
                "background": list(cfg.background), "grid": cfg.grid, "view_size": VIEW_SIZE,
                "max_masks": mask_slots(settings)}
    stats.update(plan_s=time.perf_counter() - t0, compute_s=0.0, computed=0)
    held: dict = {}

    def clip():
        if "clip" not in held:
            held["clip"] = load_biomedclip(cfg.biomedclip, cfg.device)
        return held["clip"]

    def open_writer(attach: bool) -> A3Writer:
        embed_dim = None if attach else _finished_embed_dim(cfg.out)
        return A3Writer(cfg.out, identity=identity, keys=plan.keys, index=plan.index,
                        embed_dim=clip().embed_dim if embed_dim is None else embed_dim, storage=cfg.storage,
                        shard_size=cfg.shard_size, resume=cfg.resume, attach=attach)

    def compute(writer: A3Writer, owned: list[int], pending: list[int]) -> None:
        t1 = time.perf_counter()
        total = sum(len(writer.shard_rows(s)) for s in pending)
        _compute_shards(cfg, writer, held, clip, settings, plan, owned, dist, total)
        stats.update(compute_s=time.perf_counter() - t1, computed=total)

    def finalize(writer: A3Writer) -> A3Manifest:
        return _select_and_finish(cfg, writer, plan, identity, held.get("sam_json"), clip, stats)

    return ShardedBuild(cfg.out, open_writer=open_writer, pending=lambda w: w.pending_shards(), compute=compute,
                        finalize=finalize, reopen=lambda: A3Manifest.load(cfg.out)).run(dist)


def _sam_json(identity: dict, sam) -> dict:
    return {**identity["sam"], "arch": sam.arch, "model": sam.to_json()}


def _select_and_finish(cfg: A3BuildConfig, writer: A3Writer, plan, identity: dict, sam_json: dict | None, clip,
                       stats: dict) -> A3Manifest:
    """Rank 0, once every image shard is in: each question's top-k from the *stored* crop features, then
    index.json and the manifest, with the ``--skip-bad`` failures of every rank (from the shard markers).
    ``sam_json``: the SAM this rank ran (None: it ran none); ``clip()``: BiomedCLIP, loaded on first use."""
    import time

    from teacher_cache.a3tune.select import compute_selection, selection_name

    t2 = time.perf_counter()
    failed_keys = writer.failed_keys()
    failed_rows = {r for r, k in enumerate(plan.keys) if k in failed_keys}
    questions, left = collect_questions(cfg, plan.index, failed_rows)
    name = selection_name(cfg.query_template, cfg.top_k, identity["biomedclip"]["dir_sha256"],
                          [q["qkey"] for q in questions], [q["image_row"] for q in questions],
                          [q["query_sha"] for q in questions])
    if writer.existing is not None and writer.existing.selection.get("name") == name:
        stats.update(select_s=0.0, reselected=False)
        return writer.existing
    model = clip()
    rows = writer.image_rows()
    try:
        def features(row: int) -> np.ndarray:
            count, _, emb = rows.read(row, with_emb=True)
            return np.asarray(emb, np.float32).reshape(-1, writer.embed_dim)[:count]

        arrays = compute_selection(questions, features,
                                   lambda texts: model.encode_texts(texts, cfg.text_batch_size), cfg.top_k,
                                   cfg.progress)
    finally:
        rows.close()
    if writer.existing is not None:
        sam_json = writer.existing.sam
    elif sam_json is None:  # every shard was in before a kill: the arch is read off the file again
        from teacher_cache.a3tune.sam import load_sam
        sam_json = _sam_json(identity, load_sam(cfg.sam, "cpu"))
    k_counts = (arrays["top_idx"] >= 0).sum(axis=1)
    selection = {"name": name, "template": cfg.query_template, "top_k": cfg.top_k, "questions": len(questions),
                 "texts": len({q["text"] for q in questions}), "no_labels": int((k_counts == 0).sum()),
                 "left_out": left}
    manifest = writer.finish(selection=selection, arrays=arrays, sam=sam_json, biomedclip=model.to_json(),
                             sources=plan.sources)
    stats.update(select_s=time.perf_counter() - t2, reselected=not stats["computed"])
    return manifest


class _Shard:
    """One shard's rows as they arrive."""

    def __init__(self, rows: range, mask_width: int, emb_width: int):
        self.rows = rows
        self.counts = np.zeros(len(rows), np.int16)
        self.masks = np.zeros((len(rows), mask_width), np.uint8)
        self.emb = np.zeros((len(rows), emb_width), np.float32)
        self.filled = 0
        self.failures: list[dict[str, str]] = []
        self.failed: set[int] = set()


def _compute_shards(cfg: A3BuildConfig, writer: A3Writer, held: dict, clip, settings, plan, owned: list[int], dist,
                    total: int) -> None:
    """SAM and the crop features of the shards ``owned`` (this rank's), each committed when full; the
    models load only on a rank that owns a shard (``held["sam_json"]`` then names the SAM that ran).
    ``total``: the rows of the whole job (rank 0's bar)."""
    from shared.cache.parallel import job_progress, shard_batches
    from shared.distributed import maybe_die
    from teacher_cache.a3tune.geometry import crop_for_clip, masks_to_grid
    from teacher_cache.a3tune.sam import generate_masks, load_sam

    st = writer.storage
    loader = DataLoader(_Views(plan.paths, plan.keys, cfg.geometry, cfg.background),
                        batch_sampler=shard_batches(writer, owned, cfg.batch_size), num_workers=cfg.num_workers,
                        collate_fn=_collate)
    rel_of_row: dict[int, str] = {}
    for rel, row in plan.index.items():
        rel_of_row.setdefault(row, rel)
    plan_failures = list(plan.failures) if 0 in owned else []
    buffers: dict[int, _Shard] = {}
    with job_progress(dist, f"the build of {cfg.out}", total=total, desc=f"SAM + BiomedCLIP -> {cfg.out.name}",
                      enabled=cfg.progress) as beat:
        if owned:
            sam = load_sam(cfg.sam, cfg.device)
            held["sam_json"] = _sam_json(writer.identity, sam)
            model = clip()
        for items in loader:
            beat.check()
            shard = items[0][0] // writer.shard_size
            buf = buffers.get(shard) or buffers.setdefault(shard, _Shard(writer.shard_rows(shard), st.mask_width,
                                                                         st.emb_width))
            crops, owners = [], []
            for row, view, error in items:
                local = row - buf.rows.start
                if error is not None:
                    if not cfg.skip_bad:
                        raise MedAlignError(f"bad image {plan.paths[row]}: {error} (nothing was written for its "
                                            "shard; pass --skip-bad to record and skip it)")
                    buf.failed.add(row)
                    buf.failures.append({"path": rel_of_row.get(row, str(plan.paths[row])), "reason": error,
                                         "key": plan.keys[row]})
                    continue
                masks = generate_masks(sam, view, settings)
                if len(masks) > st.max_masks:
                    raise RuntimeError(f"SAM returned {len(masks)} masks, more than the {st.max_masks} slots its "
                                       "settings allow")
                buf.counts[local] = len(masks)
                if masks:
                    cells = masks_to_grid(np.stack([m.segmentation for m in masks]), cfg.geometry, cfg.grid)
                    packed = np.packbits(np.asarray(cells, bool), axis=1)
                    buf.masks[local, :packed.size] = packed.reshape(-1)
                    crops.extend(crop_for_clip(view, m) for m in masks)
                    owners.extend((local, j) for j in range(len(masks)))
            if crops:
                feats = model.encode_crops(crops, batch_size=max(len(crops), 1))
                d = model.embed_dim
                for (local, j), f in zip(owners, feats):
                    buf.emb[local, j * d:(j + 1) * d] = f
            buf.filled += len(items)
            beat.add(len(items))
            if buf.filled == len(buf.rows):
                del buffers[shard]
                failures = buf.failures + (plan_failures if shard == 0 else [])
                writer.write_shard(shard, buf.counts, buf.masks, buf.emb, failures=failures, failed_rows=buf.failed)
                maybe_die("shard", dist)


__all__ = ["A3BuildConfig", "build_a3_cache", "collect_questions", "mask_slots", "student_background"]
